"""`ddrl data list` (the published prompt sets and whether each is in the cache) and `ddrl data
get NAME...` (download them into ``<cache>/data/<NAME>/``). Torch-free."""

from __future__ import annotations

from ddrl.cli.args import say
from ddrl.data.published import SETS, check_set, set_folder
from ddrl.errors import DDRLError


def cmd_data(args) -> None:
    stray = [a for a in (*args.names, *args.overrides) if "=" in a]
    if stray:
        raise DDRLError(f"ddrl data takes no key=value settings; got {' '.join(stray)}")
    if args.action == "list":
        if args.names:
            raise DDRLError("ddrl data list takes no names; ddrl data get NAME downloads one")
        for name, entry in SETS.items():
            folder = set_folder(name, args.cache)
            have = [f for f in entry["files"] if (folder / f).is_file()]
            state = "in the cache" if len(have) == len(entry["files"]) else "not fetched"
            repo, commit = entry["sources"][0]
            print(f"{name}  ({', '.join(entry['files'])}; {state})")
            print(f"    github.com/{repo} @ {commit[:12]}: {entry['about']}")
        print(f"cache: {set_folder('NAME', args.cache).parent}/<set>/; get one: ddrl data get NAME")
        return
    if not args.names:
        raise DDRLError(f"ddrl data get needs a set name; allowed: {', '.join(SETS)}")
    for name in args.names:  # every name checked before anything is downloaded
        check_set(name)
    from ddrl.data.download import get_set

    for name in args.names:
        folder = get_set(name, args.cache, log=say)
        print(folder)
