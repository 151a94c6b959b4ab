"""The shape of the package (docs/ARCHITECTURE.md): imports point one way, the core loads no
plotting code, a config resolves without torch, and an algorithm pays only for what it uses."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ddrl"
# Lower layers first; a module may import its own layer and the ones before it only.
LAYERS = [
    {"errors"},
    {"config", "io", "phases", "flow", "watch", "serving"},
    {"models", "sde"},
    {"advantages", "sampling"},
    {"data", "rewards", "losses"},
    {"dist"},
    {"evaluation"},
    {"training"},
    {"experiments", "plan", "vote"},
    {"cli", "__main__"},
]
CORE = ("config", "models", "data", "rewards", "losses", "dist", "evaluation", "training")


def _modules() -> dict[str, Path]:
    return {
        ".".join(("ddrl", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in SRC.rglob("*.py")
    }


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The ddrl modules ``path`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("ddrl"):
            assert n.level == 0, f"{path}: relative import"
            out.add(n.module)
            out.update(f"{n.module}.{a.name}" for a in n.names)
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names if a.name.startswith("ddrl"))
    return out


def _layer(module: str) -> int:
    """A component's registry (its package ``__init__``) and ``config`` module are torch-free
    and read by ``config.schema``: they sit in the config layer; every other module in its
    package's."""
    parts = module.split(".")
    if parts[1:2] and parts[1] in CORE and (len(parts) == 2 or parts[2:] == ["config"]):
        return 1
    part = parts[1] if len(parts) > 1 else ""
    return next(i for i, group in enumerate(LAYERS) if part in group)


def test_imports_point_down_the_layers():
    mods = _modules()
    for name, path in mods.items():
        if name == "ddrl":
            continue
        for target in _imports(path, top_level_only=False):
            if target in mods:
                assert _layer(target) <= _layer(name), f"{name} imports {target} (a back-arrow)"


def test_no_import_cycles_and_no_private_imports():
    mods = _modules()
    graph = {
        name: {t for t in _imports(path, top_level_only=True) if t in mods and t != name}
        for name, path in mods.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " → ".join([*stack, node, nxt])
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
    for path in mods.values():
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ddrl"):
                private = [a.name for a in n.names if a.name.startswith("_")]
                assert not private, f"{path}: imports private {private} from {n.module}"


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints a JSON object."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_core_imports_no_plotting_experiments_or_cli():
    core = sorted(n for n in _modules() if n.split(".")[1:2] and n.split(".")[1] in CORE)
    got = _fresh(
        "import importlib, json, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'matplotlib'"
        " or m.startswith(('ddrl.experiments', 'ddrl.cli'))]\n"
        "print(json.dumps({'bad': bad, 'n': len(" + repr(core) + ")}))"
    )
    assert got["n"] > 50 and got["bad"] == []


def test_a_config_resolves_and_describes_without_torch():
    got = _fresh(
        "import json, sys\n"
        "from ddrl.config import build_config, describe\n"
        "from ddrl.errors import DDRLError\n"
        "cfg = build_config([], ['preset=tiny-sd3', 'algorithm=flow_grpo'])\n"
        "text = describe(cfg)\n"
        "try:\n    build_config([], ['train.iterations=ten'])\nexcept DDRLError as e:\n"
        "    err = str(e)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'lines': len(text.splitlines()),"
        " 'err': err}))"
    )
    assert not got["torch"] and got["lines"] > 100
    assert got["err"] == "train.iterations='ten' is not an int"


def test_flow_grpo_builds_no_data_set_and_ddrl_does(tmp_path, monkeypatch):
    """A Flow-GRPO run with data.source=synthetic on a diffusers family, on a fresh cache,
    builds no data pool (no synthetic set is generated or drawn from); DDRL with the same
    settings generates it (the data term needs it)."""
    from ddrl.config import build_config
    from ddrl.training.components import build_components

    monkeypatch.setenv("DDRL_CACHE", str(tmp_path / "cache"))
    base = ["preset=tiny-sd3", "data.source=synthetic", "data.synthetic_per_prompt=1"]
    quiet = {"log": lambda *a, **k: None}
    flow = build_components(build_config(overrides=[*base, "algorithm=flow_grpo"]), **quiet)
    assert flow.pool is None and not flow.paired
    assert not (tmp_path / "cache" / "synthetic").exists()
    ddrl = build_components(build_config(overrides=[*base, "algorithm=ddrl"]), **quiet)
    assert ddrl.pool is not None and ddrl.paired
    assert len(list((tmp_path / "cache" / "synthetic").glob("*.safetensors"))) == 1


@pytest.mark.parametrize(
    "algorithm, data, reference, transitions",
    [("ddrl", True, False, True), ("sft", True, False, False), ("flow_grpo", False, True, True)]
    + [(a, False, False, True) for a in ("grpo", "dance_grpo")]
    + [("nft", False, True, False), ("nft_data", True, False, False)]
    + [("awm", False, True, False), ("awm_data", True, False, False)],
)
def test_each_loss_says_what_it_needs(algorithm, data, reference, transitions):
    from ddrl.losses import needs

    assert needs(algorithm) == {"data": data, "reference": reference, "transitions": transitions}
