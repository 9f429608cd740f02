"""Run by an environment's own python (a venv, or inside the image): the distributions installed,
and the dependency closure of `medserve[<extras>]` (argv[1], comma-separated). Markers other than
`extra` are not evaluated: an over-approximation, fine for "may this package be here" checks.
Prints JSON {"installed": [...], "closure": [...]} with normalized names. Standard library only;
CI reads this file and runs it with `python -c` (so it also works inside the image)."""
import importlib.metadata as m
import json
import re
import sys


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


dists = {norm(d.metadata["Name"]): d for d in m.distributions()}


def requires(dist, extras):
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        wanted = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if wanted is None or wanted.group(1) in extras:
            yield norm(re.match(r"\s*([A-Za-z0-9._-]+)", spec).group(1))


closure, todo = set(), [("medserve", set(sys.argv[1].split(",")) if len(sys.argv) > 1 else set())]
while todo:
    name, extras = todo.pop()
    if name in closure or name not in dists:
        continue
    closure.add(name)
    todo += [(r, set()) for r in requires(dists[name], extras)]
print(json.dumps({"installed": sorted(dists), "closure": sorted(closure)}))
