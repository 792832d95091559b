"""Which batches bound a replica's GPU memory (the probe itself needs CUDA: benchmarks/ runs it)."""

from __future__ import annotations

from deployments.diffusion.memory import ProbeShape, worst_case_shapes


def test_worst_cases_are_a_full_native_batch_and_the_largest_images() -> None:
    shapes = worst_case_shapes(native_side=1024, max_side=1536, size_multiple=64, max_batch_size=8,
                               max_batch_megapixels=8 * 1024**2 / 1e6)
    assert shapes == [ProbeShape(1024, 8), ProbeShape(1536, 3)]
    assert all(s.megapixels <= 8 * 1024**2 / 1e6 for s in shapes)


def test_largest_side_shrinks_to_what_the_budget_admits() -> None:
    # 0.5 MP: a 1024² image (1.05 MP) would be refused by the ingress; the largest allowed is 704².
    shapes = worst_case_shapes(native_side=512, max_side=1024, size_multiple=64, max_batch_size=8,
                               max_batch_megapixels=0.5)
    assert shapes == [ProbeShape(512, 1), ProbeShape(704, 1)]


def test_native_equal_to_largest_is_probed_once() -> None:
    assert worst_case_shapes(native_side=64, max_side=64, size_multiple=8, max_batch_size=4,
                             max_batch_megapixels=1.0) == [ProbeShape(64, 4)]


def test_largest_side_is_one_the_size_rules_accept() -> None:
    # max_side 1000 is no multiple of 64: the ingress snaps to 960 and the engine refuses 1000.
    shapes = worst_case_shapes(native_side=512, max_side=1000, size_multiple=64, max_batch_size=8,
                               max_batch_megapixels=8.0)
    assert shapes == [ProbeShape(512, 8), ProbeShape(960, 8)]
