# A fake of MicroPython's `ntptime` (tests/firmware/test_board.py): the unix port's clock
# is the host's, already set.
host = "pool.ntp.org"


def settime():
    pass
