"""mode='compile': the run's steps compiled for TPU slices this machine does not have (libtpu's compiler).

Small models on 2x2 slices keep each compile to seconds; the report must be what the compiled executable
says about itself, the step must be the one the run builds (TPU convolutions, fsdp shardings), and a stage
that does not fit must say by how much.
"""

import jax
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="the TPU compiler ships in libtpu (the test extra installs it)")

from helpers import digits_config  # noqa: E402
from noisy_student import compile_only, inference, sharding, train, trainer  # noqa: E402
from noisy_student.models import create_model  # noqa: E402


def _config(topology, stages="train", **model):
  config = digits_config()
  config.mode = "compile"
  config.compile.topology = topology
  config.compile.stages = stages
  config.data.labeled_batch = 16
  config.data.eval_batch = 32
  config.label.batch = 32
  config.model.update(model)
  return config


@pytest.fixture(autouse=True)
def _no_persistent_cache():
  with compile_only.without_persistent_cache():
    yield


@pytest.fixture(scope="module")
def v3_mesh():
  return sharding.create_mesh(fsdp=2, devices=compile_only.topology_devices("v3:2x2"))


def test_report_is_the_compiled_steps_own_analysis(v3_mesh):
  """Every number of the train report comes from memory_analysis() / cost_analysis() of the executable."""
  config = _config("v3:2x2")
  config.mesh.update(fsdp=2, param_sharding="fsdp")
  model = trainer.build_model(config, v3_mesh)
  chip = compile_only.CHIPS["v3"]
  compiled, report = compile_only._train_stage(config, model, v3_mesh, chip, v3_mesh.size)
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
  assert report["argument_bytes"] == memory.argument_size_in_bytes
  assert report["temp_bytes"] == memory.temp_size_in_bytes
  assert report["peak_bytes"] == (
    memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes + memory.temp_size_in_bytes
  )
  assert report["flops_per_device"] == cost["flops"] > 0
  assert report["images_per_step"] == 16 and report["images_per_device"] == 2  # 8 v3 cores
  bound = max(cost["flops"] / chip.peak_flops, cost["bytes accessed"] / chip.hbm_bytes_per_s)
  assert report["step_seconds_lower_bound"] == pytest.approx(bound)
  assert report["images_per_second_per_chip_upper_bound"] == pytest.approx(2 * 2 / bound)
  assert report["fits"]


def test_fsdp_parameters_enter_the_compiled_step_sharded_as_the_rules_say(v3_mesh):
  config = _config("v3:2x2", name="efficientnet-b0", image_size=32)
  config.mesh.update(fsdp=2, param_sharding="fsdp")
  model = trainer.build_model(config, v3_mesh)
  compiled, _ = compile_only._train_stage(config, model, v3_mesh, compile_only.CHIPS["v3"], v3_mesh.size)
  state_in = jax.tree.leaves(compiled.input_shardings[0][0].params)
  _, tx = trainer.build_optimizer(config, 1, 1)
  expected = jax.tree.leaves(
    jax.tree.map(lambda x: x.sharding, train.abstract_train_state(model, tx, 32, v3_mesh, "fsdp").params)
  )
  assert len(state_in) == len(expected) > 0
  sharded = 0
  for got, want in zip(state_in, expected):
    assert got.is_equivalent_to(want, 4), (got, want)
    sharded += "fsdp" in str(want.spec)
  assert sharded > 10  # b0's large kernels are split, not only replicated


def test_auto_convolutions_follow_the_tpu_devices_not_the_cpu_backend(v3_mesh):
  """From a CPU process, 'auto' must compile the TPU's native (grouped) depthwise convolution, and the
  labeling step must run each device's rows in one pass, as on a TPU."""
  assert jax.default_backend() == "cpu" and sharding.platform(v3_mesh) == "tpu"
  config = _config("v3:2x2")
  model = trainer.build_model(config, v3_mesh)
  assert model.conv_impl == "xla" and create_model("efficientnet-tiny").conv_impl == "auto"
  step = jax.jit(inference.make_forward(model, mesh=v3_mesh, micro_batch=0))
  variables = compile_only._eval_variables(model, 16, v3_mesh, "replicate")
  text = step.lower(variables, compile_only._images(64, 16, v3_mesh)).as_text()
  assert "feature_group_count" in text  # the native depthwise convolution, not CPU's shifted form
  assert "while" not in text  # 8 images per device in one pass: no micro-batch loop
  assert inference.micro_batch_size(32, 0, sharding.platform(v3_mesh), 224 * 224) == 32  # on CPU: 8


def test_eval_flops_per_image_are_one_forward_pass():
  """The TPU eval step's FLOPs per image agree with XLA:CPU's count for the same forward pass (within 5%)."""
  config = _config("v5e:2x2", stages="eval")
  mesh = sharding.create_mesh(devices=compile_only.topology_devices("v5e:2x2"))
  model = trainer.build_model(config, mesh)
  _, report = compile_only._eval_stage(config, model, mesh, compile_only.CHIPS["v5e"], mesh.size)
  cpu_model = create_model("efficientnet-tiny", 10, conv_impl="xla")
  variables = jax.eval_shape(lambda: cpu_model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)), train=False))
  forward = jax.jit(lambda v, x: cpu_model.apply(v, x, train=False))
  cost = forward.lower(variables, jax.ShapeDtypeStruct((8, 16, 16, 3), np.float32)).compile().cost_analysis()
  cpu_per_image = cost["flops"] / 8 / 1e9
  assert report["images_per_device"] == 8
  assert report["gflop_per_image"] == pytest.approx(cpu_per_image, rel=0.05)


def test_a_stage_that_does_not_fit_says_by_how_much(tmp_path, monkeypatch):
  monkeypatch.setitem(compile_only.CHIPS, "v5e", compile_only.Chip("v5e", 2**20, 197e12, 819e9))
  config = _config("v5e:2x2", stages="train")
  with pytest.raises(compile_only.DoesNotFitError, match=r"the train step needs .* GiB more than the 0\.0 GiB"):
    compile_only.compile_report(config, str(tmp_path))
  report = (tmp_path / compile_only.REPORT_FILE).read_text()
  assert '"fits": false' in report  # the report is written before the error


@pytest.mark.parametrize(
  "name, expected",
  [
    ("v2-8", ("v2:2x2", "")),
    ("v3-32", ("v3:4x4", "")),
    ("v3-64", ("v3:4x8", "")),
    ("v3-2048", ("v3:32x32", "")),  # the paper's pod: 2048 cores
    ("v4-8", ("v4:2x2x1", "megacore")),
    ("v4-32", ("v4:2x2x4", "megacore")),
    ("v4-128", ("v4:4x4x4", "megacore")),
    ("v5p-128", ("v5p:4x4x4", "")),
    ("v5litepod-16", ("v5e:4x4", "")),
    ("v6e-256", ("v6e:16x16", "")),
    ("v3:4x4", ("v3:4x4", "")),
  ],
)
def test_cloud_accelerator_types_map_to_their_slices(name, expected):
  assert compile_only.resolve_topology(name) == expected


@pytest.mark.parametrize("name, devices", [("v4-32", 16), ("v3-64", 64), ("v5litepod-8", 8), ("v5p-32", 16)])
def test_the_mapped_slices_have_the_cloud_types_device_counts(name, devices):
  """One JAX device per TensorCore on v2 / v3, per chip elsewhere (v4 and v5p as megacore)."""
  assert len(compile_only.topology_devices(*compile_only.resolve_topology(name))) == devices


def test_unknown_topology_and_stage_are_named():
  with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
    compile_only.chip_of("v9:2x2")
  with pytest.raises(ValueError, match="expected a topology .* or a Cloud accelerator type"):
    compile_only.resolve_topology("tpu-32")
  with pytest.raises(ValueError, match="config.compile.stages='train,fly'"):
    compile_only.parse_stages("train,fly")
