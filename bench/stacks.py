"""Where the CPU time of a training step goes, from py-spy's collapsed stacks (speed.py --pyspy):
share of samples under each frame (inclusive) and at the top of the stack (self), by function.
    python bench/stacks.py pyspy.txt [--top 40] [--grep bitsandbytes]"""

import argparse
import collections
import re


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--thread", default="", help="only stacks whose thread label contains this")
    a = ap.parse_args()
    incl, self_, total = collections.Counter(), collections.Counter(), 0
    for line in open(a.path):
        stack, _, n = line.rstrip().rpartition(" ")
        if not stack or (a.thread and a.thread not in stack.split(";")[0]):
            continue
        n = int(n)
        total += n
        # frames look like "function (path/to/file.py:123)"; key by function and file, not line
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")[1:]]
        for f in set(frames):
            incl[f] += n
        if frames:
            self_[frames[-1]] += n
    print(f"{total} samples")
    for name, c in (("inclusive", incl), ("self", self_)):
        print(f"--- {name}")
        for f, n in c.most_common(a.top):
            print(f"{100 * n / total:6.1f}%  {f[:150]}")


if __name__ == "__main__":
    main()
