"""Pure logic, no processes: stage ordering, prompt expansion, data split, output writing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from paraflow.errors import ParaflowError
from paraflow.graph import execution_order, input_binding
from paraflow.outputs import OutputSink, check_output_dir, write_outputs
from paraflow.run import expanded_prompts
from paraflow.strategies.data import split_evenly


def stage(inputs: list[str], outputs: list[str]) -> SimpleNamespace:
    return SimpleNamespace(inputs=inputs, outputs=outputs)


def test_order_follows_names_not_file_order() -> None:
    stages = {"save": stage(["pixels"], ["saved"]), "decode": stage(["latents"], ["pixels"]),
              "denoise": stage(["noise", "cond"], ["latents"]),
              "encode": stage(["prompts"], ["cond"]), "noise": stage(["image_ids"], ["noise"])}
    order = execution_order(stages)
    assert order.index("encode") < order.index("denoise") < order.index("decode")
    assert order.index("decode") < order.index("save")
    assert order.index("noise") < order.index("denoise")


def test_missing_input_is_named() -> None:
    with pytest.raises(ParaflowError, match="input 'pixels'.*produced by no stage"):
        execution_order({"save": stage(["pixels"], ["saved"])})


def test_cycle_and_double_producer_are_refused() -> None:
    with pytest.raises(ParaflowError, match="cycle"):
        execution_order({"a": stage(["y"], ["x"]), "b": stage(["x"], ["y"])})
    with pytest.raises(ParaflowError, match="produced by both"):
        execution_order({"a": stage(["prompts"], ["x"]), "b": stage(["prompts"], ["x"])})


def test_an_input_bound_under_another_name_orders_by_its_value() -> None:
    assert input_binding("vignetted as pixels") == ("vignetted", "pixels")
    assert input_binding("latents") == ("latents", "latents")
    stages = {"save": stage(["soft as pixels"], ["saved"]), "soften": stage(["pixels"], ["soft"]),
              "decode": stage(["prompts"], ["pixels"])}
    assert execution_order(stages) == ["decode", "soften", "save"]
    with pytest.raises(ParaflowError, match="input 'sharp' is produced by no stage"):
        execution_order({"save": stage(["sharp as pixels"], ["saved"])})


@pytest.mark.parametrize("n,parts", [(4, 2), (5, 2), (1, 2), (8, 3), (0, 2)])
def test_split_evenly_covers_in_order(n: int, parts: int) -> None:
    blocks = [list(split_evenly(n, parts, p)) for p in range(parts)]
    assert [i for b in blocks for i in b] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_prompts_expand_in_output_order() -> None:
    cfg = SimpleNamespace(prompt=["a", "b"], images_per_prompt=2)
    assert expanded_prompts(cfg) == ["a", "a", "b", "b"]  # type: ignore[arg-type]


def _sink(n: int) -> OutputSink:
    sink = OutputSink((4, 4, 3), (4, 1, 1), False)
    sink.add(list(range(n))[::-1], np.full((n, 4, 4, 3), 7, np.uint8), None)
    return sink


def test_outputs_written_in_index_order_and_never_overwritten(tmp_path: Path) -> None:
    names = write_outputs(tmp_path, _sink(3), {"strategy": "x"})
    assert names == ["images/0000.png", "images/0001.png", "images/0002.png"]
    assert (tmp_path / "run.json").is_file()
    with pytest.raises(ParaflowError, match="already holds a run"):
        check_output_dir(tmp_path)
    with pytest.raises(ParaflowError, match="already holds a run"):
        write_outputs(tmp_path, _sink(1), {})


def test_failed_write_leaves_no_images(tmp_path: Path) -> None:
    sink = _sink(2)
    sink.images[5] = np.zeros((2, 2), dtype=object)  # PIL cannot write this one
    with pytest.raises((TypeError, ValueError, KeyError)):
        write_outputs(tmp_path, sink, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []
