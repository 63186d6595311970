"""Planning against a real TPU topology from a CPU host: the TPU compiler (libtpu) compiles the sharded NoteLLM
train step for a slice this machine does not have, as MaxText's `train_compile` does.

`jax.experimental.topologies.get_topology_desc` turns a topology name (`v5p:2x2x1`) into device descriptions
with real chip coordinates; the mesh is laid out over them (several slices: a hybrid mesh whose `data` axis
crosses the data-centre network), the step is lowered with the abstract, born-sharded state and compiled. The
compiled program gives the per-device memory the TPU allocator will reserve (`memory_analysis`), the FLOPs and
HBM bytes XLA's cost model counts (`cost_analysis`), and its HLO text names every collective; a roofline from
the chip's published peaks (CHIPS) turns those into a step-time bound and the MFU it implies.

Nothing here initialises a TPU backend: the process stays on `JAX_PLATFORMS=cpu`, and only the topology
description is asked of libtpu. Without libtpu, `libtpu_version()` is None and `notellm plan` uses the CPU
backend's estimate (tools/plan.py).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from importlib import metadata


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float        # HBM per chip
    bf16_tflops: float    # peak dense bf16 FLOP/s per chip, in TFLOP/s
    hbm_gbps: float       # HBM bandwidth per chip, GB/s
    ici_gbps: float       # bidirectional inter-chip interconnect bandwidth per chip, GB/s
    dcn_gbps: float       # data-centre network bandwidth per chip, GB/s (multi-slice)


# Published per-chip figures (Cloud TPU system-architecture pages, docs.cloud.google.com/tpu/docs/<name>):
CHIPS = {
    # v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s; the page gives no per-chip ICI figure: 1.1 PB/s all-reduce
    # bandwidth per 4096-chip pod is ~270 GB/s per chip, taken as 300 (6 links); DCN assumed as v5p's.
    "v4": Chip(32, 275, 1200, 300, 6.25),
    # v5e: 197 TFLOP/s, 16 GB at 819 GB/s, ICI 400 GB/s bidirectional, 2 x 100 Gbps NICs per 8 chips.
    "v5e": Chip(16, 197, 819, 400, 3.125),
    # v5p: 459 TFLOP/s, 95 GiB at 2765 GB/s, ICI 1200 GB/s bidirectional, DCN 50 Gbps per chip.
    "v5p": Chip(95, 459, 2765, 1200, 6.25),
    # v6e (Trillium): 918 TFLOP/s, 32 GB at 1638 GB/s, ICI 800 GB/s bidirectional, DCN as v5e per chip x2 assumed.
    "v6e": Chip(32, 918, 1638, 800, 6.25),
}

# Slice names as Cloud TPU sells them -> the topology libtpu describes (chips per slice = product of dims;
# v4/v5p count two TensorCores per chip in the name, run as one megacore device per chip).
SLICES = {
    "v4-8": "v4:2x2x1", "v4-32": "v4:2x2x4", "v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2",
    "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4", "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4",
}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


def libtpu_version() -> str | None:
    """The installed libtpu's version, or None when it is absent (then only the CPU-backend plan runs)."""
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def write_text(path: str, text: str) -> None:
    """`text` to `path`, gzip-compressed when the name ends in .gz (a 7B step's HLO is tens of MB)."""
    import gzip  # only when writing HLO

    with (gzip.open(path, "wt") if path.endswith(".gz") else open(path, "w")) as f:
        f.write(text)


def resolve_topology(name: str) -> tuple[str, str]:
    """(chip generation, libtpu topology name) from `v5p-8` or `v5p:2x2x1`."""
    topology = SLICES.get(name, name)
    generation = topology.split(":", 1)[0]
    if ":" not in topology or generation not in CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}: a slice ({', '.join(SLICES)}) or "
                         f"GEN:AxBxC with GEN in {', '.join(CHIPS)}")
    return generation, topology


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """The TPU devices of `num_slices` slices of `topology`, described by libtpu (no TPU needed)."""
    from jax.experimental import topologies  # imports jax: after the command's before_jax hook

    # v4 and v5p chips have two TensorCores run as one "megacore" device (MaxText's chip_config_name); left to
    # its default, libtpu describes v4 as one device per core (32 for v4-32) with half a chip's HBM each.
    megacore = {"chip_config_name": "megacore"} if topology.split(":")[0] in ("v4", "v5p") else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, num_slices=num_slices,
                                             **megacore).devices)


def topology_mesh(mesh_config, devices: list, num_slices: int = 1):
    """The run's (data, fsdp, tensor) mesh over topology devices. With several slices the data axis is split:
    `num_slices` ways over DCN (outermost), the rest of `mesh.data` within each slice over ICI."""
    from jax.experimental import mesh_utils  # imports jax: as above
    from jax.sharding import Mesh  # as above

    from notellm_jax import sharding as shd  # as above

    if num_slices == 1:
        return shd.make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices=devices)
    per_slice = len(devices) // num_slices
    data = mesh_config.data if mesh_config.data != -1 else num_slices
    if data % num_slices:
        raise ValueError(f"mesh.data={data} must be a multiple of --num-slices {num_slices}")
    sizes = [data // num_slices, mesh_config.fsdp, mesh_config.tensor]
    known = math.prod(s for s in sizes if s != -1)
    sizes = [per_slice // known if s == -1 else s for s in sizes]
    grid = mesh_utils.create_hybrid_device_mesh(sizes, [num_slices, 1, 1], devices=devices)
    return Mesh(grid, shd.MESH_AXES)


_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")


def hlo_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines} and the entry computation's name, from HLO text."""
    computations, entry, current = {}, "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.rstrip() == "}":  # a custom call's payload may hold lines that start with "}"
            current = None
        elif current is not None:
            computations[current].append(line)
    return computations, entry


def execution_counts(computations: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry: a while body runs its trip count (the
    scanned layers), fusions, calls and branches once per execution of their caller."""
    counts: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int) -> None:
        counts[name] += times
        for line in computations.get(name, ()):
            body = re.search(r"\bbody=%?([\w.\-]+)", line)
            trips = while_trips(line, computations) if body else 1
            callees = _CALLEE.findall(line)
            for group in _BRANCHES.findall(line):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            for callee in callees:
                visit(callee, times * (trips if body and callee == body.group(1) else 1))

    visit(entry, 1)
    return dict(counts)


def while_trips(line: str, computations: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the bound of its `i < N` condition (a scan's
    counter starts at 0); 1 when neither is readable."""
    known = _TRIP.search(line)
    if known:
        return int(known.group(1))
    condition = re.search(r"\bcondition=%?([\w.\-]+)", line)
    lines = computations.get(condition.group(1), ()) if condition else ()
    bounds = [int(m) for text in lines for m in re.findall(r"s32\[\]\S* constant\((\d+)\)", text)]
    less_than = any("direction=LT" in text for text in lines)
    return bounds[0] if less_than and len(bounds) == 1 else 1


_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "custom-call"}


def _scheduled(computations: dict[str, list[str]], entry: str) -> set[str]:
    """The computations that run as sequences of kernels (entry, loop bodies and conditions, branches,
    calls), as opposed to fused computations and reducers, which run inside one kernel."""
    found, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in found or name not in computations:
            continue
        found.add(name)
        for line in computations[name]:
            todo += re.findall(r"\b(?:body|condition)=%?([\w.\-]+)", line)
            todo += [c.strip().lstrip("%") for g in _BRANCHES.findall(line) for c in g.split(",") if c.strip()]
            if re.search(r" call\(", line):
                todo += re.findall(r"to_apply=%?([\w.\-]+)", line)
    return found


def _kernel_bytes(op: str, result: list[int], operands: list[int], body: str) -> int:
    """HBM bytes one kernel moves: operands read, results written. Two in-place forms move less: a
    dynamic-update-slice writes only its update into a buffer that its result aliases (a scan stacking
    per-layer residuals), and a dynamic slice reads only the slice (a scan reading one layer's weights)."""
    if op == "dynamic-update-slice" or "dynamic-update-slice(" in body:
        aliased = [size for size in operands if size in result]
        rest = [size for size in operands if size not in result]
        return 2 * sum(rest) + sum(size for size in result if size not in aliased)
    if op == "dynamic-slice" or "dynamic-slice(" in body:
        slices = [b for line in body.splitlines() if " dynamic-slice(" in line
                  for b in shape_bytes(line.split("=", 1)[1].split(" dynamic-slice(")[0])]
        cap = max([sum(result)] + slices)
        operands = [min(size, cap) for size in operands]
    return sum(result) + sum(operands)


def _fused_text(name: str, bodies: dict[str, str], depth: int = 3) -> str:
    """A fused computation's text with the fusions nested in it."""
    text = bodies.get(name, "")
    if depth:
        text += "".join("\n" + _fused_text(c, bodies, depth - 1) for c in re.findall(r"calls=%?([\w.\-]+)", text))
    return text


def hbm_traffic(hlo: str) -> float:
    """Bytes read from and written to HBM per step, summed over the kernels of a compiled program with loop
    trips counted (XLA's own cost analysis counts a while body once): each kernel's operands and result."""
    computations, entry = hlo_computations(hlo)
    counts = execution_counts(computations, entry)
    bodies = {name: "\n".join(lines) for name, lines in computations.items()}
    total = 0.0
    for name in _scheduled(computations, entry):
        sizes: dict[str, int] = {}
        for line in computations[name]:
            found = _INSTRUCTION.match(line)
            if not found:
                continue
            result = shape_bytes(found.group(2))
            sizes[found.group(1)] = sum(result)
            op = found.group(3)
            if op in _NO_TRAFFIC or op.endswith("-done"):
                continue
            operands = [sizes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", found.group(4).split(")", 1)[0])]
            callee = re.search(r"calls=%?([\w.\-]+)", line)
            body = _fused_text(callee.group(1), bodies) if callee and op == "fusion" else ""
            total += _kernel_bytes(op, result, operands, body) * counts.get(name, 1)
    return total


def shape_bytes(shape: str) -> list[int]:
    """Bytes of each array in an HLO result type (`bf16[4,128]{...}` or a tuple of them)."""
    return [DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in _SHAPE.findall(shape)]


def device_group(attributes: str, num_devices: int) -> list[int]:
    """The device ids in the first replica group of a collective (or the first source/target pair)."""
    explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if explicit:
        return [int(i) for i in explicit.group(1).split(",") if i]
    pairs = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", attributes)
    if pairs:
        return [int(pairs.group(1)), int(pairs.group(2))]
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attributes)
    if iota:
        import numpy as np  # only for iota replica groups

        dims = [int(d) for d in iota.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(p) for p in iota.group(4).split(",")])
        return ids.reshape(int(iota.group(1)), int(iota.group(2)))[0].tolist()
    return _mesh_group(attributes, num_devices)


def _mesh_group(attributes: str, num_devices: int) -> list[int]:
    """`replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}`: devices in iota order over the named axes;
    the group of device 0 varies the selected axes with the others at 0. No groups: every device."""
    found = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if not found:
        return list(range(num_devices))
    import numpy as np  # only for mesh-style replica groups

    axes = re.findall(r"'(\w+)'=(\d+)", found.group(1))
    chosen = set(re.findall(r"'(\w+)'", found.group(2)))
    ids = np.arange(math.prod(int(n) for _, n in axes)).reshape([int(n) for _, n in axes])
    index = tuple(slice(None) if name in chosen else 0 for name, _ in axes)
    return ids[index].reshape(-1).tolist()


def _collective_kind(op: str, computation: str) -> str | None:
    """The collective an HLO op is, or None. TPU writes a reduce-scatter as an all-reduce inside an
    `all-reduce-scatter` fusion; async pairs are counted at their `-start`."""
    base = op.removesuffix("-start")
    if base not in COLLECTIVES or op.endswith("-done"):
        return None
    return "reduce-scatter" if base == "all-reduce" and computation.startswith("all-reduce-scatter") else base


def _payload(op: str, shape: str) -> int:
    """Bytes of the collective's full buffer per device: an async start's type also lists its operands
    (and u32 context words), so its second half is the result."""
    sizes = shape_bytes(shape)
    if op in ("all-gather-start", "collective-permute-start"):
        sizes = [s for s in sizes if s > 4]
        sizes = sizes[len(sizes) // 2:]
    return sum(sizes)


# Bytes each device sends per byte of buffer, ring algorithms over a group of n: all-gather and
# reduce-scatter (n-1)/n, all-reduce twice that, all-to-all (n-1)/n, a permute the whole buffer.
def _wire_bytes(kind: str, size: int, n: int) -> float:
    if kind == "collective-permute":
        return float(size)
    share = (n - 1) / n if n > 1 else 0.0
    return size * share * (2 if kind == "all-reduce" else 1)


def collectives(hlo: str, mesh) -> dict:
    """Every collective of a compiled program, per step: {kind: {count, bytes, wire_bytes, by_axes}}, where
    bytes is the buffer size per device, wire_bytes what one device sends (ring estimate), and by_axes splits
    both by the mesh axes the group spans (device ids in HLO groups are positions in the flattened mesh)."""
    import numpy as np  # mesh coordinates of device ids

    computations, entry = hlo_computations(hlo)
    counts = execution_counts(computations, entry)
    shape, names = tuple(mesh.devices.shape), tuple(mesh.axis_names)
    out: dict = {}
    for computation, lines in computations.items():
        for line in lines:
            found = _INSTRUCTION.match(line)
            dcn = re.search(r'_xla_megascale_transfer_type="(\w+)"', line) if found and found.group(3) == "send" else None
            kind = found and (dcn.group(1).lower().replace("_", "-") if dcn else _collective_kind(found.group(3), computation))
            if not kind or not counts.get(computation):
                continue
            if dcn:  # across slices: a host-transfer send to the Megascale (DCN) runtime, slices "{1,2}x{...}"
                axes, size = "dcn", shape_bytes(found.group(2))[0]
                n = len(re.search(r'_xla_megascale_target="\{([\d,]*)\}', line).group(1).split(","))
            else:
                group = device_group(found.group(4), math.prod(shape))
                coords = np.array(np.unravel_index(group, shape)).T
                axes = "+".join(n for i, n in enumerate(names) if len(set(coords[:, i])) > 1) or "none"
                size, n = _payload(found.group(3), found.group(2)), len(group)
            times = counts[computation]
            wire = _wire_bytes(kind, size, n)
            entry_ = out.setdefault(kind, {"count": 0, "bytes": 0, "wire_bytes": 0.0, "by_axes": {}})
            axis_entry = entry_["by_axes"].setdefault(axes, {"count": 0, "bytes": 0, "wire_bytes": 0.0})
            for record in (entry_, axis_entry):
                record["count"] += times
                record["bytes"] += size * times
                record["wire_bytes"] += wire * times
    return out


def cost_figures(compiled) -> dict:
    """XLA's cost model for the per-device program. Its while loops (the scanned layers) are counted once,
    not per trip, so these undercount a scanned model's step by about the layer count."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"xla_flops_loop_once": float(cost.get("flops", 0.0)),
            "xla_bytes_accessed_loop_once": float(cost.get("bytes accessed", 0.0))}


def roofline(chip: Chip, model_flops: float, hbm_bytes: float, comm: dict, dcn_axis: str | None) -> dict:
    """Per-device step-time bounds: compute (model FLOPs at peak bf16), HBM traffic, and collectives (wire
    bytes over ICI, or DCN for groups spanning `dcn_axis`). `step_s` assumes perfect overlap (the largest
    term), `serial_s` none; MFU = model FLOPs / (step_s x peak)."""
    ici = sum(a["wire_bytes"] for c in comm.values() for axes, a in c["by_axes"].items()
              if dcn_axis is None or dcn_axis not in axes.split("+"))
    dcn = sum(c["wire_bytes"] for c in comm.values()) - ici
    terms = {"compute_s": model_flops / (chip.bf16_tflops * 1e12), "hbm_s": hbm_bytes / (chip.hbm_gbps * 1e9),
             "ici_s": ici / (chip.ici_gbps * 1e9), "dcn_s": dcn / (chip.dcn_gbps * 1e9)}
    step_s = max(terms.values())
    return {**terms, "step_s": step_s, "serial_s": sum(terms.values()),
            "bound_by": max(terms, key=terms.get).removesuffix("_s"),
            "mfu": terms["compute_s"] / step_s if step_s else 0.0,
            "mfu_no_overlap": terms["compute_s"] / sum(terms.values()) if step_s else 0.0}


def report(compiled, mesh, generation: str, figures: dict) -> dict:
    """Memory against the chip's HBM, cost, collectives per step and the roofline of a compiled step."""
    return analyse(compiled.as_text(), mesh, generation, figures, cost_figures(compiled))


def analyse(hlo: str, mesh, generation: str, figures: dict, cost: dict) -> dict:
    """`report` from the HLO text (HBM traffic: `hbm_traffic`, loop trips counted; collectives across slices
    go over DCN); `mesh` needs only `.devices.shape` and `.axis_names`, so a saved HLO can be re-read."""
    chip = CHIPS[generation]
    comm = collectives(hlo, mesh)
    model_flops = figures["model_tflops_per_step"] * 1e12 / mesh.devices.size
    hbm_bytes = hbm_traffic(hlo)
    comm_bytes = sum(c["wire_bytes"] for c in comm.values())
    return {"chip": {**dataclasses.asdict(chip), "generation": generation}, "hbm_gib": chip.hbm_gib,
            "fits": figures["per_device_gib"] <= chip.hbm_gib,
            "headroom_gib": chip.hbm_gib - figures["per_device_gib"], **cost,
            "model_flops_per_device": model_flops, "hbm_bytes_estimate": hbm_bytes,
            "collectives": comm, "collective_wire_bytes": comm_bytes,
            "collective_share_of_bytes": comm_bytes / (comm_bytes + hbm_bytes) if hbm_bytes else 0.0,
            "roofline": roofline(chip, model_flops, hbm_bytes, comm, "dcn")}


def splash_lowering(topology: str, mesh_config, batch: int, length: int, heads: int, kv_heads: int,
                    head_dim: int = 128, window: int | None = None) -> dict:
    """Splash attention (forward and backward) under shard_map, compiled by the TPU compiler for `topology`:
    how many Mosaic kernels (`tpu_custom_call`) and collectives the program has, or why it did not lower."""
    import time  # timing only

    import jax  # imports jax: after the command's before_jax hook
    import jax.numpy as jnp  # as above
    from jax.sharding import NamedSharding, PartitionSpec as P  # as above

    from notellm_jax import sharding as shd  # as above
    from notellm_jax.model.splash import splash_attention  # as above

    mesh = topology_mesh(mesh_config, topology_devices(resolve_topology(topology)[1]))
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    shapes = [jax.ShapeDtypeStruct((batch, length, n, head_dim), jnp.bfloat16, sharding=rows)
              for n in (heads, kv_heads, kv_heads)] + [jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)]

    def loss(q, k, v, key_mask):
        with shd.axis_rules(mesh):
            return splash_attention(q, k, v, key_mask, window=window).astype(jnp.float32).sum()

    out = {"topology": topology, "mesh": dict(mesh.shape), "batch": batch, "length": length, "heads": heads,
           "kv_heads": kv_heads, "head_dim": head_dim, "window": window}
    start = time.time()
    try:
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*shapes).compile().as_text()
    except Exception as err:  # noqa: BLE001 - a kernel that does not lower is a finding: record why
        return {**out, "lowered": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:500]}"}
    return {**out, "lowered": True, "compile_s": round(time.time() - start, 1),
            "mosaic_kernels": hlo.count("custom_call_target=\"tpu_custom_call\""),
            "collectives": {k: v["count"] for k, v in collectives(hlo, mesh).items()}}
