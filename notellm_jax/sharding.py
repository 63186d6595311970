"""The one place where logical tensor axes meet the device mesh.

Parameters are created with logical axis names (`("embed", "mlp")`); activations are constrained with
`act_*` names at block boundaries. `LOGICAL_RULES` maps both to the mesh axes `data`, `fsdp` and
`tensor`, so changing the parallelism of a run is a config change (the mesh shape), never a code change.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes). Weights are split over fsdp along the model dimension and
# over tensor along heads / mlp / vocab (Megatron style); batches over data x fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("emb_proj", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def axis_rules(mesh: Mesh):
    """Use inside a traced function: `nn.with_logical_constraint` on activations then resolves through
    LOGICAL_RULES against `mesh` (without it those constraints are silently no-ops)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take every remaining device."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{math.prod(sizes)} devices, have {len(devices)}")
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (ValueError, AssertionError, NotImplementedError) as e:
        # Fine for CPU and single hosts; on a TPU slice a plain reshape ignores the physical topology and
        # collectives get much slower, so say so.
        logger.warning("topology-aware mesh %s on %d %s devices failed (%s: %s); using the devices in "
                       "enumeration order", dict(zip(MESH_AXES, sizes)), len(devices), devices[0].platform,
                       type(e).__name__, e)
        grid = np.array(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config) -> Mesh:
    """The run's mesh from its `MeshConfig` (data, fsdp, tensor sizes): the one place tools build it."""
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)


_warned: set[tuple] = set()


def _parameter_name(path) -> str:
    """The parameter's dict path: the same for the parameter and its optimiser moments."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _fit_to_shape(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str = "") -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. 3 KV heads over 2-way tensor); warns once
    per parameter, since every replicated dimension costs memory on each device."""
    fitted = []
    for axis, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names) if names else 1
        if names and dim % size:
            key = (name, axis, dim, names, size)
            if key not in _warned:
                _warned.add(key)
                logger.warning("parameter %s: dimension %d (size %d) does not divide over mesh axes %s (%d "
                               "devices), so it is replicated", name or "?", axis, dim, names, size)
            fitted.append(None)
        else:
            fitted.append(axes)
    return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a tree of (possibly boxed) logically partitioned values or ShapeDtypeStructs."""
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    unboxed = nn.meta.unbox(abstract_tree)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, leaf: NamedSharding(mesh, _fit_to_shape(spec, leaf.shape, mesh, _parameter_name(path))),
        mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays: the leading axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_on(boxed: Any, mesh: Mesh) -> Any:
    """Unboxed ShapeDtypeStructs of a tree of logically partitioned (boxed) values, each carrying its
    NamedSharding on `mesh` from the logical rules; nothing is allocated."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(boxed),
                        logical_shardings(boxed, mesh))


def host_to_global(value: Any, target: jax.ShapeDtypeStruct) -> jax.Array:
    """A host array -> the global array `target` describes; each process touches only its devices' slices."""
    value = np.asarray(value)
    return jax.make_array_from_callback(target.shape, target.sharding,
                                        lambda index: value[index].astype(target.dtype))
