"""``ddrl doctor``: a config's preflight checks (``ddrl.training.preflight``) without training.
The config is resolved as ``ddrl train`` resolves it, the components and the loss are built as
training builds them (``prepare_learner``), and no run folder is written. Under torchrun every
rank runs the checks (FSDP forwards are collectives) and rank 0 prints them."""

from __future__ import annotations

from ddrl.cli.args import resolve_args, say
from ddrl.data.published import require_data


def cmd_doctor(args) -> None:
    """Print one line per check and "doctor: all N checks passed"; a failing check is the
    one-line error (exit status 2)."""
    cfg = resolve_args(args)
    require_data(cfg.data)  # every data file there, before torch and the model load
    # Imported here: a bad config answers before torch and the families load.
    from ddrl.dist.group import is_main, main_first, process_group
    from ddrl.training.components import build_components, device_of
    from ddrl.training.loop import prepare_learner
    from ddrl.training.preflight import preflight

    dev = device_of(cfg)
    with process_group(dev):
        with main_first():  # rank 0 first: it may build the base or the synthetic set
            c = build_components(cfg, say)
        learner, _, _ = prepare_learner(cfg, c, dev, say)
        show = print if is_main() else (lambda *a: None)
        lines = preflight(cfg, c, learner.loss_fn, dev, show)
    na = sum(line.startswith("n/a") for line in lines)
    show(f"doctor: all {len(lines)} checks passed" + (f" ({na} not applicable)" if na else ""))
