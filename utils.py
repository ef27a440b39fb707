"""Run plumbing for train.py, none of it RL: a dataclass config from YAML and flags, processes (torchrun,
FSDP2 / DDP, metric reduction), the run directory (its refusals, config.yaml, metrics.jsonl and wandb), and
atomic, resumable checkpoints.

Config: `parse_dataclass(Config, argv)` makes every field a flag (`--name VALUE`, bools take true/false) with its
`metadata["help"]`; precedence is defaults < a resumed run's config.yaml < `--config FILE` < flags. An unknown
key or flag, or a value of the wrong type, stops with a one-line error that names it.

Checkpoints: run_dir/checkpoints/step_N/ holds the model and tokenizer (save_pretrained: eval.py and any Hugging
Face tool load it) and state.pt (optimiser, scheduler, step, the caller's state; plain tensors and Python
values, so torch.load(weights_only=True) reads it). step_N is written as step_N.tmp and renamed, then the file
run_dir/latest is replaced atomically: a run killed while saving still resumes from the previous checkpoint.

Bad input: code that checks an input raises UserError; `cli(main)` (each command's `__main__`) prints it as one line,
`error: <input> <what is wrong>; <what to do>`, and exits 2, the status argparse uses for a bad flag.
torch is imported inside the functions that use it: search_env.py and toy.py import this module too, and their
refusals should not wait for torch to load.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
from pathlib import Path

import yaml


class UserError(Exception):
    """An input the user must fix; the message names the input, what is wrong with it, and what to do."""


def cli(main, argv=None):
    """Run a command's main(argv): a UserError becomes one line on stderr and exit status 2, no traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

# ------------------------------------------------------------------------------------------------ config


def _as_bool(s: str) -> bool:
    low = s.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _typed(key: str, value, typ, where: str):
    """A YAML value checked against the field's type (ints are accepted as floats; so is '1e-6', which
    YAML 1.1 reads as a string)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if type(value) is not typ:
        raise UserError(f"{where}: '{key}' must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def read_yaml(path, fields: dict) -> dict:
    """{key: value} of a YAML config file, each key a known field and each value of the field's type."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"--config {path} does not exist; give the path of a YAML file") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config keys (key: value lines)")
    for k in data:
        if k not in fields:
            raise UserError(f"unknown config key '{k}' in {path}; known keys: {', '.join(fields)}")
    return {k: _typed(k, v, fields[k].type, str(path)) for k, v in data.items()}


def parse_dataclass(cls, argv=None, description: str = ""):
    """An instance of the dataclass `cls` from defaults < RESUME/config.yaml < --config FILE < flags. A field
    named `resume` holding a run directory makes that run's saved config the base, with run_dir = it."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML file of config overrides (flags override it)")
    for name, f in fields.items():
        p.add_argument(f"--{name}", type=_as_bool if f.type is bool else f.type, default=argparse.SUPPRESS,
                       metavar=f.type.__name__.upper(), help=f"{f.metadata['help']} (default: {f.default!r})")
    flags = vars(p.parse_args(argv))
    values = {}
    if flags.get("resume"):
        saved = Path(flags["resume"]) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume {flags['resume']} has no config.yaml; pass a run directory train.py wrote")
        values.update(read_yaml(saved, fields))
        values["run_dir"] = flags["resume"]
    if flags.get("config"):
        values.update(read_yaml(flags["config"], fields))
    values.update({k: v for k, v in flags.items() if k != "config"})
    return cls(**values)


# ------------------------------------------------------------------------------------------------ processes

def rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def setup_device(name: str = "") -> torch.device:
    """The device (`name`, else this rank's GPU, else CPU); joins the process group under torchrun."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:  # torch 2.11's set_device refuses a bare "cuda"
        device = torch.device("cuda", local)  # this rank's GPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():  # torchrun, even with one rank: FSDP2 / DDP run
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def wrap_model(model, mode: str, device, bf16: bool = False):
    """Under torchrun: FSDP2 (each decoder layer, then the root; bf16 params with fp32 gradient reduction when
    asked) or DDP. Alone: the model itself. FSDP2 and DDP both average gradients over ranks."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if bf16 else {}
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for m in model.modules():
        if type(m).__name__ in blocks:
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unwrap(model):
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def gathered(model):
    """The plain module with full parameters, for no-grad passes. FSDP: all-gather once here, not at every
    forward (every decode step), so ranks may also run different numbers of forwards; reshard after."""
    if hasattr(model, "module"):  # DDP: the inner module has no hooks
        yield model.module
        return
    mods = fsdp_modules(model)
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in mods:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


@contextlib.contextmanager
def grad_sync(model, sync: bool):
    """Gradient reduction across ranks only when `sync` (the last micro-batch of a mini-batch)."""
    if hasattr(model, "no_sync") and not sync:
        with model.no_sync():
            yield
        return
    if fsdp_modules(model):
        model.set_requires_gradient_sync(sync)  # the root; recurses into the layers
    yield


def all_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.all_reduce(t)
    return t


class Meter:
    """Metrics as (numerator, denominator) sums, maxima and minima, reduced over ranks in three collectives.
    Every rank must add the same names (a 0 denominator, -inf for a maximum or inf for a minimum when it has
    nothing); a metric nobody had anything for is left out of the row."""

    def __init__(self):
        self.num, self.den, self.max, self.min = {}, {}, {}, {}

    def add(self, name: str, num: float, den: float = 1.0):
        self.num[name] = self.num.get(name, 0.0) + float(num)
        self.den[name] = self.den.get(name, 0.0) + float(den)

    def add_max(self, name: str, value: float):
        self.max[name] = max(self.max.get(name, -math.inf), float(value))

    def add_min(self, name: str, value: float):
        self.min[name] = min(self.min.get(name, math.inf), float(value))

    def reduce(self, device) -> dict:
        import torch
        import torch.distributed as dist

        keys = sorted(self.num)
        t = all_sum(torch.tensor([self.num[k] for k in keys] + [self.den[k] for k in keys],
                                 dtype=torch.float64, device=device)).tolist()
        out = {k: t[i] / t[i + len(keys)] for i, k in enumerate(keys) if t[i + len(keys)] > 0}
        for values, op in ((self.max, "MAX"), (self.min, "MIN")):
            names = sorted(values)
            m = torch.tensor([values[k] for k in names], dtype=torch.float64, device=device)
            if dist.is_initialized() and names:
                dist.all_reduce(m, op=getattr(dist.ReduceOp, op))
            out.update((k, v) for k, v in zip(names, m.tolist()) if math.isfinite(v))
        return out


# ------------------------------------------------------------------------------------------------ the run directory

def run_dir_for(cfg) -> tuple[Path, Path | None]:
    """The run directory (cfg.run_dir, or runs/<date-time> named by rank 0) and, with cfg.resume, the checkpoint
    to continue from. Refuses what would mix two runs: a run_dir that already holds one (without --resume), a
    --resume with no checkpoint yet, or a path that is a file."""
    import time

    import torch.distributed as dist

    run_dir = cfg.run_dir or time.strftime("runs/%Y%m%d-%H%M%S")
    if dist.is_initialized():  # ranks could straddle a second
        box = [run_dir]
        dist.broadcast_object_list(box, src=0)
        run_dir = box[0]
    run_dir = Path(run_dir)
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and (run_dir / "config.yaml").exists():
        how = f"pass --resume {run_dir} to continue it" if latest_checkpoint(run_dir) else "it has no checkpoint"
        raise UserError(f"run_dir {run_dir} already holds a run ({how}); choose another --run_dir")
    if cfg.resume and ckpt is None:
        raise UserError(f"--resume {cfg.resume} has no checkpoint yet (no {run_dir / 'latest'}); "
                        "start it again in a new --run_dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run_dir {run_dir} is a file; give a folder path")
    return run_dir, ckpt


def write_config(run_dir: Path, cfg) -> None:
    """Rank 0 creates run_dir and writes the resolved config to run_dir/config.yaml (and prints it)."""
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    if rank_world()[0] != 0:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--run_dir {run_dir} cannot be created ({e.strerror}); pick a writable folder") from None
    write_atomic(run_dir / "config.yaml", text)
    print("config:\n  " + text.strip().replace("\n", "\n  "), flush=True)


def resume_from(ckpt: Path, run_dir: Path, model, optimizer, scheduler, state: dict) -> int:
    """Load the optimiser and scheduler of `ckpt` and its values of the keys of `state` (in place); drop the rows
    metrics.jsonl and trajectories.jsonl got after it. Returns its step."""
    saved = load_checkpoint(ckpt, model, optimizer, scheduler)
    state.update({k: saved[k] for k in state})
    if rank_world()[0] == 0:
        truncate_jsonl(run_dir / "metrics.jsonl", saved["step"])
        truncate_jsonl(run_dir / "trajectories.jsonl", saved["step"])
        print(f"resumed from {ckpt} at step {saved['step']}", flush=True)
    return saved["step"]


class MetricsLog:
    """One row per step into run_dir/metrics.jsonl and, with a wandb project, to wandb (rank 0 only; one wandb run
    across resumes, its id kept in run_dir/wandb_id)."""

    def __init__(self, run_dir: Path, cfg):
        self.path, self.wb = run_dir / "metrics.jsonl", None
        self.on = rank_world()[0] == 0
        if cfg.wandb_project and self.on:
            import wandb

            id_file = run_dir / "wandb_id"
            if not id_file.exists():
                write_atomic(id_file, os.urandom(4).hex())
            self.wb = wandb.init(project=cfg.wandb_project, name=run_dir.name, id=id_file.read_text().strip(),
                                 resume="allow", dir=str(run_dir), mode=cfg.wandb_mode, config=dataclasses.asdict(cfg))

    def log(self, row: dict) -> None:
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.wb is not None:
                self.wb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self) -> None:
        if self.wb is not None:
            self.wb.finish()


# ------------------------------------------------------------------------------------------------ checkpoints

def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data) -> None:
    """The project's one way to write a file: `data` (str, bytes, or a function that writes into a binary file
    object, e.g. `lambda f: np.save(f, a)`) goes to a sibling .tmp, which is fsynced, renamed over `path`, and
    the folder fsynced. The rename alone is atomic but not durable: after a power loss the new name can point
    at a file whose blocks never reached the disk."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise UserError(f"{path} could not be written ({e.strerror}); free disk space and run again") from None
        raise
    _fsync(path.parent)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final` (replacing it), durably: every file in it and the folder
    itself are fsynced before the rename, the parent after it (write_atomic's rule, for a folder)."""
    tmp, final = Path(tmp), Path(final)
    for p in sorted(tmp.rglob("*"), reverse=True):  # files and subfolders before the folders holding them
        _fsync(p)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                    keep: int = 1) -> Path | None:
    """run_dir/checkpoints/step_N, then run_dir/latest (module docstring); the `keep` newest are kept (at least
    the one just written). Every rank must call it (FSDP gathers the full state); rank 0 writes and gets the
    path. A failed write (a full disk) removes its partial folder and leaves the previous checkpoint."""
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=full)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=full)  # keyed by parameter name
    if rank_world()[0] != 0:
        return None
    ckpts = run_dir / "checkpoints"
    final, tmp = ckpts / f"step_{step:06d}", ckpts / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        unwrap(model).save_pretrained(tmp, state_dict=model_sd)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optim_sd, "scheduler": scheduler.state_dict(), **state},
                   tmp / "state.pt")
        publish_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a kill or a bug too: no partial folder stays behind
        # a full disk reaches us as OSError (tokenizer, config), RuntimeError (torch.save's zip writer) or
        # SafetensorError (the weights, written by Rust)
        if not isinstance(e, (OSError, RuntimeError)) and type(e).__name__ != "SafetensorError":
            raise
        free = shutil.disk_usage(run_dir).free / 2**30
        raise UserError(f"checkpoint {final} could not be written ({str(e).strip().splitlines()[0]}; {free:.1f} "
                        f"GiB free); free disk space, then continue with --resume {run_dir}") from None
    write_atomic(run_dir / "latest", final.name + "\n")
    done = sorted(p for p in ckpts.iterdir() if p.name.startswith("step_") and not p.name.endswith(".tmp"))
    for p in done[:-max(keep, 1)]:  # never the one `latest` names
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    f = run_dir / "latest"
    return run_dir / "checkpoints" / f.read_text().strip() if f.is_file() else None


def load_checkpoint(ckpt: Path, model, optimizer, scheduler) -> dict:
    """Optimiser and scheduler state from ckpt/state.pt (the weights come from from_pretrained(ckpt)); returns
    the rest of state.pt. Works across world sizes: the optimiser state is keyed by parameter name."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = torch.load(ckpt / "state.pt", weights_only=True, map_location="cpu")
    set_optimizer_state_dict(model, optimizer, saved.pop("optimizer"),
                             options=StateDictOptions(full_state_dict=dist.is_initialized()))
    scheduler.load_state_dict(saved.pop("scheduler"))
    return saved


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, value) of each non-empty line of a JSONL file a run appends to (one write per row). A last line
    without its newline that is not JSON is a row being written, or cut off by a kill: it is left out. A broken line
    anywhere else is a UserError naming the file and the line."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except ValueError:
            if i == len(lines):
                continue
            raise UserError(f"{path} line {i} is not JSON; fix or delete that line") from None
    return out


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop the rows a killed run wrote after its last checkpoint (and a row it was cutting off): resuming writes
    them again. Rows are written back as train.py wrote them (json.dumps), so the kept lines keep their bytes."""
    if path.is_file():
        rows = [row for _, row in read_jsonl(path) if row["step"] <= step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
