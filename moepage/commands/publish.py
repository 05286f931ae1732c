"""`moepage publish OUT --repo-id OWNER/NAME [--dry-run]`: upload a model directory to the Hugging Face Hub."""
from __future__ import annotations

import sys


def register(sub):
    p = sub.add_parser("publish", help="upload a model directory to the Hugging Face Hub")
    p.add_argument("folder", help="model directory (e.g. the output of extract or prune)")
    p.add_argument("--repo-id", required=True, help="OWNER/NAME on the Hub")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; no network")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--token", default=None, help="Hub token (default: the huggingface_hub login / HF_TOKEN)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moepage.surgery.publish import publish

    r = publish(args.folder, args.repo_id, dry_run=args.dry_run, private=args.private,
                commit_message=args.message, token=args.token)
    for w in r["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    verb = "would upload" if r["dry_run"] else "uploaded"
    print(f"{verb} {len(r['files'])} files ({r['bytes'] / 2**20:.1f} MiB) to {r['repo_id']}:")
    for path, size in r["files"]:
        print(f"  {path}  {size}")
    if r["split"]:
        print(f"a `moepage split` directory: `moepage serve {r['repo_id']} --lazy` fetches its resident weights, "
              f"then one expert file per miss")
    if r["url"]:
        print(r["url"])
    return 0
