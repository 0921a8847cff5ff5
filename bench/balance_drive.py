"""Scenario b of bench/balance.sh: run a job, change a cgroup's CPU quota
while it trains, and keep a timestamped log of everything it prints.

  balance_drive.py LOG CPU_QUOTA_SH GROUP T1 PCT1 T2 PCT2 T3 -- CMD [ARG...]

The job runs on a pseudo-terminal (so that rank 0 prints its live progress
line, "epoch E/N  step K/S ...", a few times a second: the step clock that
places the quota changes on the step axis) in a session of its own. Time 0 is
the first progress line or replan event (training has started). At T1
seconds the group's quota becomes PCT1 percent, at T2 PCT2, and at T3 the
job is stopped (SIGTERM to its session, SIGKILL 10 s later). LOG gets one
line per line of output, "SECONDS<TAB>TEXT" (SECONDS since the job started),
and "SECONDS<TAB>#quota PCT" at each change, "SECONDS<TAB>#train" at time 0.
Exit code: 0 when the job ran until T3 (or finished after T2), else 1.
"""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

STEP = re.compile(r"epoch \d+/\d+\s+step \d+/\d+")


def main():
    if len(sys.argv) < 11 or sys.argv[9] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    log_path, cq, group = sys.argv[1:4]
    t1, pct1, t2, pct2, t3 = float(sys.argv[4]), sys.argv[5], float(sys.argv[6]), sys.argv[7], float(sys.argv[8])
    cmd = sys.argv[10:]
    master, slave = pty.openpty()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    log = open(log_path, "w")

    def note(text):
        log.write("%.3f\t%s\n" % (time.monotonic() - start, text))

    t0 = None
    pending = [(t1, pct1), (t2, pct2)]
    stopped_at = None
    buf = b""
    ok = False
    while True:
        now = time.monotonic()
        if t0 is not None:
            while pending and now - t0 >= pending[0][0]:
                _, pct = pending.pop(0)
                note("#quota " + pct)
                subprocess.run([cq, "set", group, pct], check=False)
            if stopped_at is None and now - t0 >= t3:
                note("#stop")
                ok = True
                stopped_at = now
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if stopped_at is not None and now - stopped_at > 10 and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if t0 is None and now - start > 300:
            note("#no training output within 300 s")
            os.killpg(proc.pid, signal.SIGKILL)
        r, _, _ = select.select([master], [], [], 0.05)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer has closed the terminal
                data = b""
            if not data:
                break
            buf += data
            parts = re.split(rb"[\r\n]", buf)
            buf = parts.pop()
            for p in parts:
                text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", p.decode("utf-8", "replace")).strip()
                if not text:
                    continue
                if t0 is None and (STEP.search(text) or '"replan"' in text):
                    t0 = time.monotonic()
                    note("#train")
                note(text)
        elif proc.poll() is not None and not r:
            break
    proc.wait()
    if stopped_at is None:
        note("#exit %d" % proc.returncode)
        ok = proc.returncode == 0 and not pending
    log.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
