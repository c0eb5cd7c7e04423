"""noisy_student.cpu.devices: how many host devices the CLI splits a CPU into, and the XLA_FLAGS it sets."""

from noisy_student.cpu import devices as host_devices


def test_device_count_is_a_power_of_two_up_to_eight():
  assert [host_devices.device_count_for(c) for c in (1, 2, 3, 4, 6, 8, 12, 96)] == [1, 2, 2, 4, 4, 8, 8, 8]


def test_split_adds_the_flag_unless_xla_flags_chose():
  env = {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=512"}
  assert host_devices.split_per_core(env, cores=6) == 4
  assert env["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=512 --xla_force_host_platform_device_count=4"
  chosen = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  assert host_devices.split_per_core(chosen, cores=6) == 0
  assert chosen == {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  empty = {}
  assert host_devices.split_per_core(empty, cores=2) == 2
  assert empty == {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
