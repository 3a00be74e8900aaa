"""Step statistics: Prometheus histogram semantics (an observation counts in every bucket >= it)."""

from services.engine import Engine, SamplingParams
from services.engine.stats import Histogram


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]
    assert h.count == 4 and h.total == 6.0


def test_engine_steps_are_counted_per_phase(ds_dir):
    engine = Engine.from_pretrained(ds_dir, max_prefill_tokens=8)
    engine.generate([list(range(3, 23))], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    stats = engine.stats.snapshot()
    assert stats.tokens == {"prefill": 20, "decode": 3}
    assert stats.seconds["prefill"].count == 3  # 20 prompt tokens in chunks of 8
    assert stats.batch["decode"].count == 3 and stats.batch["decode"].total == 3
    assert stats.seconds["decode"].total > 0
