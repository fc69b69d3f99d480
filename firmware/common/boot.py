# Runs at power-on, before main.py: join the network (the board layer's: Wi-Fi, or
# Ethernet on a Pyboard) and set the clock (SAS tokens and reading timestamps need it).
# Failures here are not fatal: main.py tries again.
import board
import config_local as config

try:
    board.connect_network(config)
    board.sync_clock(config)
except Exception as exc:
    board.log("boot: " + repr(exc))
