"""fluxserve.gpus: which GPUs get a worker process each, found without torch (detection injected)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fluxserve.config import Settings, settings_problems
from fluxserve.gpus import parse_gpus, worker_gpus


def no_gpus() -> list[str]:
    return []


def test_a_list_is_taken_as_given():
    assert worker_gpus("0,2", environ={}, list_gpus=no_gpus) == ["0", "2"]
    assert worker_gpus(" 3 ", environ={"CUDA_VISIBLE_DEVICES": "0,1"}, list_gpus=no_gpus) == ["3"]


def test_all_is_every_visible_gpu_from_cuda_visible_devices_first():
    assert worker_gpus("all", environ={"CUDA_VISIBLE_DEVICES": "2,3"}, list_gpus=lambda: ["0", "1", "2", "3"]) == ["2", "3"]
    uuid = "GPU-5e4b1c2d-0000-1111-2222-333344445555"
    assert worker_gpus("all", environ={"CUDA_VISIBLE_DEVICES": uuid}, list_gpus=no_gpus) == [uuid]


def test_all_without_cuda_visible_devices_asks_nvidia_smi():
    assert worker_gpus("all", environ={}, list_gpus=lambda: ["0", "1", "2"]) == ["0", "1", "2"]


def test_no_gpu_means_one_worker_with_no_gpu_of_its_own():
    assert worker_gpus("all", environ={}, list_gpus=no_gpus) == [None]
    assert worker_gpus("all", environ={"CUDA_VISIBLE_DEVICES": ""}, list_gpus=lambda: ["0"]) == [None]
    assert worker_gpus("all", environ={"CUDA_VISIBLE_DEVICES": "-1"}, list_gpus=lambda: ["0"]) == [None]


def test_the_real_detection_runs_without_torch_and_answers_a_list():
    """On this machine: nvidia-smi or not, an answer (no GPU: one worker), never an exception."""
    found = worker_gpus("all", environ={})
    assert found and all(entry is None or entry.isdigit() for entry in found)


@pytest.mark.parametrize("bad", ["0,,1", "0;1", "0,0", "gpu 1", "../x"])
def test_a_bad_gpu_list_is_refused_naming_the_variable(bad, tmp_path):
    with pytest.raises(ValueError):
        parse_gpus(bad)
    with pytest.raises(ValidationError) as caught:
        Settings(data_dir=tmp_path, gpus=bad)
    assert settings_problems(caught.value)[0].startswith("FLUXSERVE_GPUS: ")


def test_settings_keep_a_good_list():
    assert Settings(gpus="0,2").gpus == "0,2"
    assert Settings(gpus="ALL").gpus == "all"
