"""`moepage verify DIR`: check every file of a split directory against its manifest sha256."""
from __future__ import annotations


def register(sub):
    p = sub.add_parser("verify", help="check the sizes and sha256 of every file in a split directory")
    p.add_argument("dir", help="a directory written by `moepage split` (its moepage.json lists every file's sha256)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.progress import Progress
    from moepage.surgery.split import verify_split

    with Progress(f"verify {args.dir}", unit="file") as progress:
        problems = verify_split(args.dir, progress=progress)
    for line in problems:
        print(line)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.dir}")
        return 1
    print(f"verify: {args.dir} OK")
    return 0
