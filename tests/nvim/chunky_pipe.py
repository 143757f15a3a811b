"""Run a command and relay its stdout in small, irregular writes, so that the plugin's reads
split JSON lines at arbitrary points (test helper: `python chunky_pipe.py CMD ARGS...`).
stdin and stderr pass through untouched."""

import os
import subprocess
import sys
import time

SIZES = (1, 7, 3, 64, 2, 13, 500, 5)


def main() -> int:
    child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stdin=sys.stdin, bufsize=0)
    out = sys.stdout.fileno()
    i = 0
    while True:
        data = os.read(child.stdout.fileno(), 65536)
        if not data:
            break
        pos = 0
        while pos < len(data):
            n = SIZES[i % len(SIZES)]
            i += 1
            os.write(out, data[pos:pos + n])
            pos += n
            time.sleep(0.001)  # give the reader a chance to see each piece on its own
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
