"""Reward checkpoints as an adversary or a crash leaves them: paths that reach outside the checkpoint, metadata that
tries to shadow core fields, a process killed at every step of an export, corrupt or wrongly-typed weights, malformed
`reward_config.json` (hand-picked and fuzzed), and an SD3-Medium diffusers config that omits keys diffusers defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_diffusers_transformer, random_inputs, reference_features, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from engine import RewardEngine
from engine.io.checkpoint import read_reward_config
from engine.io.single_file import diffusers_to_original

REPO = Path(__file__).resolve().parents[1]
LAYERS = (1, 3)


def tiny_engine(seed: int = 0) -> RewardEngine:
    return RewardEngine.from_preset("tiny", layers=LAYERS, dtype=torch.float32, seed=seed, kernels_backend="torch")


def head_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "head.safetensors"))


def edit_config(directory: Path, edit) -> None:
    path = directory / "reward_config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(edit(meta)))


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """An original single-file tiny base (4 blocks) that a head-only checkpoint loads on top of."""
    model = make_diffusers_transformer(seed=3)
    path = tmp_path_factory.mktemp("base") / "sd3_tiny.safetensors"
    original = diffusers_to_original(model.state_dict(), model.config.num_layers)
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    return path


@pytest.fixture
def full_checkpoint(tmp_path) -> Path:
    """A checkpoint that carries its backbone (loads without a base)."""
    return tiny_engine().save_pretrained(tmp_path / "reward", include_backbone=True)


# ------------------------------------------------------------------------------------- paths stay inside (item 2)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_backbone_weights_outside_the_checkpoint_are_refused(full_checkpoint, tmp_path, where):
    outside = tmp_path / "other" / "x.safetensors"
    outside.parent.mkdir()
    outside.write_bytes((full_checkpoint / "backbone.safetensors").read_bytes())  # a loadable file: only the path
    if where == "parent":
        edit_config(full_checkpoint, lambda m: {**m, "backbone_weights": "../other/x.safetensors"})
    elif where == "absolute":
        edit_config(full_checkpoint, lambda m: {**m, "backbone_weights": str(outside)})
    else:
        (full_checkpoint / "backbone.safetensors").unlink()
        (full_checkpoint / "backbone.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match=r"reward_config.json.*backbone_weights.*outside") as info:
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)
    assert "x.safetensors" in str(info.value) or "backbone.safetensors" in str(info.value)


def test_etc_passwd_is_never_opened(full_checkpoint):
    edit_config(full_checkpoint, lambda m: {**m, "backbone_weights": "/etc/passwd"})
    with pytest.raises(ValueError, match=r"backbone_weights.*'/etc/passwd'.*outside"):
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)


def test_head_file_symlinked_outside_is_refused(full_checkpoint, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (full_checkpoint / "head.safetensors").rename(outside)
    (full_checkpoint / "head.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match=r"head.safetensors.*outside"):
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)


def test_metadata_cannot_shadow_core_fields(tmp_path, base_file):
    engine = tiny_engine()
    target = engine.save_pretrained(
        tmp_path / "r",
        format="evil/9",
        reward={"layers": [0]},
        backbone_weights="/etc/passwd",
        backbone=None,
        training={"eval_seed": 7},
    )
    meta, reward, _ = read_reward_config(target)
    assert reward == engine.reward_config and meta["backbone_weights"] is None
    assert meta["metadata"]["training"] == {"eval_seed": 7} and meta["metadata"]["backbone_weights"] == "/etc/passwd"
    again = RewardEngine.from_pretrained(target, base=base_file, dtype=torch.float32)
    assert again.reward_config == engine.reward_config


def test_top_level_extra_keys_of_older_checkpoints_read_as_metadata(tmp_path):
    target = tiny_engine().save_pretrained(tmp_path / "r")
    edit_config(target, lambda m: {k: v for k, v in m.items() if k != "metadata"} | {"training": {"eval_seed": 5}})
    meta, _, _ = read_reward_config(target)
    assert meta["metadata"] == {"training": {"eval_seed": 5}}


def test_metadata_that_is_not_json_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        tiny_engine().save_pretrained(tmp_path / "r", training={"when": object()})
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------- exports stay whole (item 4)

# The child saves a new checkpoint over `target` and is killed (os._exit) at one step of the export.
_KILL_CHILD = textwrap.dedent(
    """
    import os, shutil, sys
    import safetensors.torch
    import torch
    from engine import RewardEngine
    import engine.io.checkpoint as loading

    target, point = sys.argv[1], sys.argv[2]
    engine = RewardEngine.from_preset("tiny", layers=(1, 3), dtype=torch.float32, seed=1)
    calls = {"replace": 0}
    real_replace, real_save = os.replace, loading.save_file

    def replace(src, dst):
        calls["replace"] += 1
        if (point, calls["replace"]) in (("before_first_replace", 1), ("between_replaces", 2)):
            os._exit(9)
        return real_replace(src, dst)

    def save_file(tensors, path, *a, **k):
        if point == "mid_write" and path.endswith("backbone.safetensors"):
            with open(path, "wb") as fh:
                fh.write(b"half a file")
            os._exit(9)
        return real_save(tensors, path, *a, **k)

    def rmtree(path, *a, **k):
        if point == "before_cleanup" and ".old-" in os.path.basename(path):
            os._exit(9)
        return real_rmtree(path, *a, **k)

    real_rmtree = shutil.rmtree
    loading.os.replace, loading.save_file, loading.shutil.rmtree = replace, save_file, rmtree
    engine.save_pretrained(target, include_backbone=True)
    os._exit(0)
    """
)

KILL_POINTS = ["mid_write", "before_first_replace", "between_replaces", "before_cleanup"]


def kill_during_export(target: Path, point: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DITREWARD_KERNELS": "torch"}
    done = subprocess.run([sys.executable, "-c", _KILL_CHILD, str(target), point], env=env, capture_output=True)
    assert done.returncode == 9, done.stderr.decode()[-2000:]


@pytest.mark.parametrize("point", KILL_POINTS)
@pytest.mark.parametrize("recovered_by", ["load", "save"])
def test_a_kill_at_any_point_of_an_export_leaves_old_or_new(tmp_path, point, recovered_by):
    target = tiny_engine(seed=0).save_pretrained(tmp_path / "reward", include_backbone=True)
    old_head = head_of(target)
    new_head = tiny_engine(seed=1).head.state_dict()
    kill_during_export(target, point)
    assert any(p.name.startswith(".reward.") for p in tmp_path.iterdir())  # the kill left something behind

    if recovered_by == "load":
        engine = RewardEngine.from_pretrained(target, dtype=torch.float32)
        head = engine.head.state_dict()
    else:
        tiny_engine(seed=2).save_pretrained(target, include_backbone=True)
        head = head_of(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward"]  # leftovers gone
    if recovered_by == "load":  # the reader found the old or the new checkpoint, whole
        olds = all(torch.equal(head[k], old_head[k]) for k in old_head)
        news = all(torch.equal(head[k], new_head[k]) for k in new_head)
        assert olds or news
        assert olds == (point in ("mid_write", "before_first_replace", "between_replaces"))


def test_a_failed_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    target = tiny_engine(seed=0).save_pretrained(tmp_path / "reward")
    old_head = head_of(target)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new checkpoint into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        tiny_engine(seed=1).save_pretrained(target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward"]
    assert all(torch.equal(head_of(target)[k], v) for k, v in old_head.items())


def test_leftovers_of_a_live_process_are_left_alone(tmp_path):
    target = tiny_engine().save_pretrained(tmp_path / "reward")
    busy = tmp_path / f".reward.tmp-{os.getpid()}-abcd1234"  # this process: alive, maybe another thread's export
    busy.mkdir()
    read_reward_config(target)
    tiny_engine().save_pretrained(target)
    assert busy.is_dir()


def test_exported_directory_gets_normal_permissions(tmp_path):
    target = tiny_engine().save_pretrained(tmp_path / "reward")
    reference = tmp_path / "made_by_mkdir"
    reference.mkdir()  # what the umask gives a new directory
    assert target.stat().st_mode & 0o777 == reference.stat().st_mode & 0o777
    assert target.stat().st_mode & 0o777 != 0o700 or reference.stat().st_mode & 0o777 == 0o700


# ------------------------------------------------------------------------------------ weights checked (item 5)


@pytest.mark.parametrize("file", ["head", "backbone"])
@pytest.mark.parametrize("damage", ["nan", "inf", "int"])
def test_corrupt_or_integer_weights_are_refused_by_file_and_tensor(full_checkpoint, file, damage):
    path = full_checkpoint / f"{file}.safetensors"
    state = load_file(str(path))
    key = "mlp.0.weight" if file == "head" else "transformer_blocks.1.ff.net.2.weight"
    if damage == "int":
        state[key] = torch.ones_like(state[key], dtype=torch.int32)
    else:
        state[key] = state[key].clone()
        state[key][0, 0] = float(damage)
    save_file(state, str(path))
    match = r"floating" if damage == "int" else r"NaN or Inf"
    with pytest.raises(ValueError, match=match) as info:
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)
    assert f"{file}.safetensors" in str(info.value) and key in str(info.value)


@pytest.mark.parametrize("damage", ["int", "nan"])
def test_base_weights_must_be_finite_floats(base_file, tmp_path, damage):
    state = load_file(str(base_file))
    key = "model.diffusion_model.joint_blocks.0.x_block.mlp.fc1.weight"
    state[key] = torch.ones_like(state[key], dtype=torch.int64) if damage == "int" else state[key] * float("nan")
    path = tmp_path / "base.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"floating" if damage == "int" else r"NaN or Inf") as info:
        RewardEngine.from_base(path, layers=LAYERS, dtype=torch.float32)
    assert "base.safetensors" in str(info.value) and "transformer_blocks.0.ff.net.0.proj.weight" in str(info.value)


def test_finite_weights_that_overflow_the_target_dtype_are_refused(full_checkpoint):
    path = full_checkpoint / "backbone.safetensors"
    state = load_file(str(path))
    state["context_embedder.weight"][0, 0] = 1e6  # finite in fp32, inf in fp16
    save_file(state, str(path))
    RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"context_embedder.weight.*float16"):
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float16)


# ------------------------------------------------------------------------ reward_config.json errors (item 6)


def _set(path: tuple[str, ...], value):
    def edit(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return meta

    return edit


def _drop(path: tuple[str, ...]):
    def edit(meta):
        node = meta
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return meta

    return edit


def _nested(depth: int) -> list:
    value: list = [0]
    for _ in range(depth):
        value = [value]
    return value


BROKEN_CONFIGS = {
    "top_level_list": (lambda m: [], "got list [], expected a JSON object"),
    "top_level_null": (lambda m: None, "got NoneType None, expected a JSON object"),
    "num_layers_float": (_set(("backbone", "config", "num_layers"), 4.5), "num_layers"),
    "num_layers_string": (_set(("backbone", "config", "num_layers"), "4"), "num_layers"),
    "num_layers_bool": (_set(("backbone", "config", "num_layers"), True), "num_layers"),
    "head_dim_float": (_set(("backbone", "config", "attention_head_dim"), 16.0), "attention_head_dim"),
    "dual_layers_float": (_set(("backbone", "config", "dual_attention_layers"), [0.5]), "dual_attention_layers"),
    "backbone_weights_int": (_set(("backbone_weights",), 123), "backbone_weights"),
    "missing_t": (_drop(("reward", "t")), "reward.t: missing"),
    "deep_nesting": (_set(("metadata", "x"), _nested(70)), "nested"),
    "layers_beyond_model": (_set(("reward", "layers"), [1, 300]), "reward.layers"),
    "missing_reward_mean": (_drop(("reward", "reward_mean")), "reward_mean"),
    "missing_reward_std": (_drop(("reward", "reward_std")), "reward_std"),
    "reward_not_a_dict": (_set(("reward",), [1, 2]), "reward"),
    "backbone_config_missing": (_drop(("backbone", "config")), "config"),
    "unknown_reward_field": (_set(("reward", "layer"), [1]), "layer"),
    "metadata_not_a_dict": (_set(("metadata",), 3), "metadata"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_config_errors_name_the_file_and_field(full_checkpoint, case):
    edit, field = BROKEN_CONFIGS[case]
    edit_config(full_checkpoint, edit)
    with pytest.raises(ValueError, match="reward_config.json") as info:
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)
    assert field in str(info.value)


def test_huge_numbers_and_fifo_configs_are_named(full_checkpoint):
    path = full_checkpoint / "reward_config.json"
    text = path.read_text()
    path.write_text(text.replace('"reward_mean": 0.0', '"reward_mean": ' + "7" * 5000))
    with pytest.raises(ValueError, match="reward_config.json: an integer of 5000 digits"):
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(ValueError, match="reward_config.json: reward config is a FIFO"):
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)


def test_non_utf8_config_is_named(full_checkpoint):
    path = full_checkpoint / "reward_config.json"
    path.write_bytes(path.read_bytes().replace(b'"layers"', b'"l\xff\xfeyers"'))
    with pytest.raises(ValueError, match=r"reward_config.json.*UTF-8"):
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)


def test_layers_beyond_the_depth_are_refused_before_loading(full_checkpoint, monkeypatch):
    from engine.io.sources import TensorSource

    edit_config(full_checkpoint, _set(("reward", "layers"), [1, 5]))

    def no_reads(*args, **kwargs):
        raise AssertionError("a tensor was read before the layers were checked")

    monkeypatch.setattr(TensorSource, "stored", no_reads)
    with pytest.raises(ValueError, match=r"reward_config.json.*layers \[5\].*4 blocks"):
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)


def test_layers_beyond_a_shallower_base_file_are_refused_before_loading(tmp_path, base_file, monkeypatch):
    from engine.io.sources import TensorSource

    target = tiny_engine().save_pretrained(tmp_path / "r")  # head only: the backbone comes from the base
    shallow = tmp_path / "shallow.safetensors"
    state = load_file(str(base_file))
    save_file(
        {k: v for k, v in state.items() if not k.startswith("model.diffusion_model.joint_blocks.3.")}, str(shallow)
    )
    monkeypatch.setattr(TensorSource, "stored", lambda *a: pytest.fail("tensor read before check"))
    with pytest.raises(ValueError, match=r"layers \[3\].*shallow.safetensors.*3 blocks"):
        RewardEngine.from_pretrained(target, base=shallow, dtype=torch.float32)


@pytest.mark.parametrize("field", ["head_hidden", "num_layers"])
def test_huge_sizes_in_a_config_allocate_nothing(full_checkpoint, field):
    """A config's sizes are checked against the files before anything of that size is built."""
    where = ("reward", "head_hidden") if field == "head_hidden" else ("backbone", "config", "num_layers")
    edit_config(full_checkpoint, _set(where, [2**40] if field == "head_hidden" else 2**40))
    try:
        RewardEngine.from_pretrained(full_checkpoint, dtype=torch.float32)
    except ValueError as e:
        assert str(full_checkpoint) in str(e)


def test_trainer_export_writes_every_required_field(tmp_path):
    """What every writer goes through (`save_reward_checkpoint`) writes each field the reader requires."""
    target = tiny_engine().save_pretrained(tmp_path / "r", training={"steps": 1})
    meta = json.loads((target / "reward_config.json").read_text())
    assert {"layers", "t", "head_hidden", "reward_mean", "reward_std"} <= set(meta["reward"])
    assert {"format", "reward", "backbone", "backbone_weights", "metadata"} <= set(meta)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _paths(node, prefix=()):
    """Every key path of a JSON document (dicts by key, lists by index)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@pytest.fixture(scope="module")
def fuzz_checkpoint(tmp_path_factory) -> tuple[Path, str]:
    target = tiny_engine().save_pretrained(tmp_path_factory.mktemp("fuzz") / "reward", include_backbone=True)
    return target, (target / "reward_config.json").read_text()


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_configs_load_or_fail_naming_the_file(fuzz_checkpoint, data):
    target, pristine = fuzz_checkpoint
    meta = json.loads(pristine)
    paths = list(_paths(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["set", "drop"] if path else ["set"]))
        if not path:
            meta = data.draw(_JSON)
            break
        try:
            parent = meta
            for key in path[:-1]:
                parent = parent[key]
            if action == "drop":
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(_JSON)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed or replaced this path
            continue
    config = target / "reward_config.json"
    try:
        config.write_text(json.dumps(meta))
        RewardEngine.from_pretrained(target, dtype=torch.float32)
    except (ValueError, TypeError) as e:
        assert "reward_config.json" in str(e) or str(target) in str(e), repr(e)
    finally:
        config.write_text(pristine)


# ------------------------------------------------------------------ diffusers' defaults for absent keys (item 13)


def test_sd3_medium_config_without_qk_norm_or_dual_attention_loads(tmp_path):
    """SD3-Medium's published transformer/config.json has neither `qk_norm` nor `dual_attention_layers`: diffusers
    builds it with qk_norm=None and no dual attention, and so must we."""
    model = make_diffusers_transformer(seed=5, qk_norm=None, dual_attention_layers=())
    model.save_pretrained(tmp_path / "sd3m" / "transformer")
    config_path = tmp_path / "sd3m" / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(
        json.dumps({k: v for k, v in config.items() if k not in ("qk_norm", "dual_attention_layers")})
    )

    engine = RewardEngine.from_base(tmp_path / "sd3m", layers=LAYERS, dtype=torch.float32, kernels_backend="torch")
    assert engine.config.qk_norm is None and engine.config.dual_attention_layers == ()
    z0, pe, po, noise = random_inputs(batch=2, h=8, w=8, text_len=9, seed=6)
    ours = engine.features(z0, (pe, po), noise=noise)
    assert rel_err(ours, reference_features(model, z0, pe, po, noise, 0.1, LAYERS)) <= 1e-4


def test_absent_key_defaults_are_diffusers_defaults():
    """The literal defaults `BackboneConfig.from_diffusers` fills absent keys with are exactly diffusers' own, for
    every BackboneConfig field."""
    import inspect

    diffusers = pytest.importorskip("diffusers")
    from engine.config import _DIFFUSERS_DEFAULTS, BackboneConfig

    fields = set(BackboneConfig.model_fields)
    parameters = inspect.signature(diffusers.SD3Transformer2DModel.__init__).parameters
    assert set(_DIFFUSERS_DEFAULTS) == fields
    assert dict(_DIFFUSERS_DEFAULTS) == {name: parameters[name].default for name in fields}
