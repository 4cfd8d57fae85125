"""Out of memory: what cannot fit is refused before a run starts; what could not be known says so.

Before the run (`jaxal.loop.prepare`): each strategy's `check_model` sees the model's variable shapes
and refuses settings that cannot fit whatever the device, with the option to use instead (the exact
solver's dense Hessian of ResNet-18: `jaxal.influence.check_exact_memory`). Everything else is bounded by
construction (every sum over a set is a loop over fixed-size chunks) but still depends on the device:
a chunk that fits one GPU does not fit another.

During the run: XLA reports an allocation it could not make as a `JaxRuntimeError` whose message
starts with RESOURCE_EXHAUSTED (on the CPU also INTERNAL: ... Out of memory allocating ...).
`jaxal.run.run_command` turns it into `out_of_memory_report(error, config)` on stderr and exit status 2
instead of a traceback: the size that failed, the device's limit where the backend reports one, the run's sizes, and the options that lower the memory, per phase and
strategy, with their current values. Cycles finished before the failure are checkpointed (once per
cycle) in the run directory.
"""

from __future__ import annotations

import re
GIB = 2**30



def _influence_options(config) -> list[tuple[str, str]]:
    opts = config.influence
    rows = [("influence.hvp_chunk_size", "labelled examples per Hessian-vector product"),
            ("influence.chunk_size", "pool and reference examples per jvp or gradient chunk")]
    if opts.solver == "exact":
        rows += [("influence.exact_block_size", "basis vectors per pass of the dense-Hessian assembly"),
                 ("influence.solver", "cg or lissa need no dense Hessian")]
    elif opts.solver == "lissa":
        rows += [("influence.repeats", "LiSSA chains run side by side"),
                 ("influence.batch_size", "labelled examples per LiSSA step (changes the estimate)")]
    else:
        rows += [("influence.solver", "lissa with --influence.batch_size 1 differentiates one example per step")]
    return rows + [("influence.params", "last_layer differentiates the head only (changes the scores)")]


def _gradnorm_options(config) -> list[tuple[str, str]]:
    return [("gradnorm.chunk_size", "pool examples per per-example-gradient chunk"),
            ("gradnorm.params", "last_layer costs a forward pass (changes the scores)")]


STRATEGY_OPTIONS = {"isal": _influence_options, "isal_v2": _influence_options, "isal_v3": _influence_options,
                    "grad_sim": _influence_options, "exp_gn": _gradnorm_options, "ent_gn": _gradnorm_options,
                    "egl": _gradnorm_options, "lplgrad": _gradnorm_options}
COMMON_OPTIONS = (("eval_batch_size", "examples per evaluation and inference chunk"),
                  ("subset_size", "pool examples scored per cycle (changes the selection)"),
                  ("batch_size", "training examples per step (changes the training)"))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is XLA's failed allocation (host or device): RESOURCE_EXHAUSTED where the allocation
    fails in the call, or (XLA:CPU) `INTERNAL: Error dispatching computation: Out of memory allocating ...`
    where it fails in a computation dispatched asynchronously and is read later."""
    import jax

    text = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text
                                                              or "Out of memory allocating" in text)


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def _value(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _device_line() -> str:
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    line = f"{device.platform}:{device.id} ({device.device_kind})"
    if "bytes_limit" in stats:
        line += f", {_gib(stats['bytes_limit'])} available to JAX"
        if "peak_bytes_in_use" in stats:
            line += f", peak in use {_gib(stats['peak_bytes_in_use'])}"
    return line


def out_of_memory_report(error: BaseException, config) -> str:
    """The message for an out-of-memory `error` in a run of `config`: what failed, the sizes, what to lower."""
    from jaxal.config import max_labeled

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    requested = re.search(r"(\d{4,}) bytes", first)
    lines = [f"out of memory on {_device_line()}: {first[:300]}"
             + (f" ({_gib(int(requested.group(1)))})" if requested else "")]
    pool = f"a random {config.subset_size} of the pool" if config.subset_size else "the whole unlabelled pool"
    lines.append(f"The run's sizes: model {config.model or 'the dataset default'}; "
                 f"up to {max_labeled(config)} labelled training examples; "
                 f"scored per cycle: {pool}; training batch {config.batch_size}; evaluation batch "
                 f"{config.eval_batch_size}.")
    lines.append("What to lower (current value in brackets; memory only unless said):")
    groups = {}
    for name in config.strategies:
        if name in STRATEGY_OPTIONS:
            groups.setdefault(STRATEGY_OPTIONS[name], []).append(name)
    groups = [(", ".join(names), options(config)) for options, names in groups.items()]
    for label, rows in groups + [("every strategy", COMMON_OPTIONS)]:
        for i, (flag, what) in enumerate(rows):
            lead = f"  {label}: " if i == 0 else " " * (len(label) + 4)
            lines.append(f"{lead}--{flag} [{_value(config, flag)}]: {what}")
    lines.append("Cycles finished before the failure are checkpointed in the run directory; a run with the same "
                 "flags resumes them, a run with changed flags starts anew (another --workdir, or --overwrite).")
    return "\n".join(lines)

