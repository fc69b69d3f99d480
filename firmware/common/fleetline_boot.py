"""The loader's part of firmware updates (docs/ota.md): run by boot.py first thing at
every boot, before any module of the application is imported.

- A bundle staged by fleetline_ota (its files in ``next/``) is swapped in: each file it
  replaces moves to ``prev/``, then the new one takes its place. The swap can be cut by
  a reset at any point and goes on at the next boot.
- The new version is then on trial: each boot counts. One that has not confirmed itself
  (connected and reported: fleetline_ota) within MAX_TRIAL_BOOTS boots is rolled back:
  the files of ``prev/`` return (the ones the bundle added go), and ``ota.json`` says
  why, which the version running again reports. An image (esp32.Partition) is rolled
  back by the ESP32 bootloader when the new one resets before it is marked valid; the
  loader sees it booted the previous partition, or asks for the rollback itself.

The loader (boot.py and this module) and the board's own files are never replaced by a
bundle: a bundle that does not come up cannot take its way back with it.
"""

import json
import os

STATE_FILE = "ota.json"
NEXT_DIR = "next"
PREV_DIR = "prev"
MAX_TRIAL_BOOTS = 3
# Never replaced by a bundle (compared without case: FAT ignores it): the loader, the
# board's settings, credentials and state, and the folders the updates and uploads use.
KEPT = ("boot.py", "fleetline_boot.py", "fleetline_boot.mpy", "config_local.py", "ca.crt",
        STATE_FILE, STATE_FILE + ".tmp", "provisioned.json", "backlog.jsonl", NEXT_DIR,
        PREV_DIR, "files", "lib", "ota.bin")
# Nor certificates and keys, whatever their names.
KEPT_SUFFIXES = (".pem", ".der", ".key", ".crt")


def replaceable(name):
    """Whether a bundle may hold a file of this name (a plain file of the application)."""
    lower = name.lower()
    if not name or len(name) > 64 or lower in KEPT or name.startswith("."):
        return False
    if any(lower.endswith(suffix) for suffix in KEPT_SUFFIXES):
        return False
    return all(c.isalpha() or c.isdigit() or c in "_-." for c in name)


def load(root=""):
    """The update's state; the temporary file's when a reset came between the two steps
    of a save (FAT removes the old file before it renames the new one)."""
    for name in (STATE_FILE, STATE_FILE + ".tmp"):
        try:
            with open(root + name) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            return state
    return None


def save(state, root=""):
    temporary = root + STATE_FILE + ".tmp"
    with open(temporary, "w") as f:
        json.dump(state, f)
    os.rename(temporary, root + STATE_FILE)


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def empty(folder):
    """``folder`` made (if missing) and emptied of files."""
    if not _exists(folder):
        os.mkdir(folder)
        return
    for name in os.listdir(folder):
        os.remove(folder + "/" + name)


def _swap(state, root):
    files = state.get("files") or []
    if "added" not in state:  # before anything moves: what the bundle adds
        state["added"] = [n for n in files if not _exists(root + n)]
        save(state, root)
    for name in files:
        new = root + NEXT_DIR + "/" + name
        if not _exists(new):
            continue  # swapped before a reset cut the swap
        old, kept = root + name, root + PREV_DIR + "/" + name
        if _exists(old) and not _exists(kept):
            os.rename(old, kept)
        os.rename(new, old)


def _restore(state, root):
    for name in state.get("files") or []:
        kept = root + PREV_DIR + "/" + name
        if _exists(kept):
            os.rename(kept, root + name)
        elif name in (state.get("added") or []) and _exists(root + name):
            os.remove(root + name)


def _booted_previous(state, partitions):
    """An image on trial, but the bootloader booted another partition: rolled back."""
    Partition = partitions.Partition
    return Partition(Partition.RUNNING).info()[4] != state.get("partition")


def start(root="", partitions=None, log=print):
    """Swap in a staged bundle, count a trial boot, roll back a version that did not
    come up; ``partitions``: the esp32 module on an ESP32 (image updates)."""
    state = load(root)
    if state is None:
        return
    phase = state.get("phase")
    if phase == "staged":
        if state.get("kind") == "bundle":
            try:
                _swap(state, root)
            except Exception as exc:  # half swapped: the previous version back, whole
                _restore(state, root)
                state["phase"] = "rolled_back"
                state["reason"] = "the swap failed: " + repr(exc)[:120]
                save(state, root)
                log("boot: " + state["reason"])
                return
        state["phase"] = "trial"
        state["boots"] = 0
        save(state, root)
        phase = "trial"
    if phase != "trial":
        return
    boots = state.get("boots", 0) + 1
    image = state.get("kind") == "image"
    if image and partitions is not None and _booted_previous(state, partitions):
        why = "the bootloader went back to the previous firmware"
    elif boots > MAX_TRIAL_BOOTS:
        why = "reset " + str(MAX_TRIAL_BOOTS) + " times before it came up"
    else:
        state["boots"] = boots
        save(state, root)
        return
    state["phase"] = "rolled_back"
    state["reason"] = "version " + str(state.get("version")) + " " + why
    if not image:
        _restore(state, root)
    save(state, root)
    log("boot: rolled back: " + state["reason"])
    if image and partitions is not None and not _booted_previous(state, partitions):
        partitions.Partition.mark_app_invalid_rollback_and_reboot()
