import math

import pytest

from trainlab.config import ConfigError
from trainlab.multiply.config import TeacherForcingConfig


def test_none_always_forces():
    tf = TeacherForcingConfig("none")
    assert all(tf.prob(s) == 1.0 for s in (0, 10, 10**6))


@pytest.mark.parametrize("schedule, mid", [("linear", 0.2 + 0.8 * 0.5), ("cosine", 0.2 + 0.8 * 0.5),
                                           ("exp", 0.2 + 0.8 * math.exp(-2.5))])
def test_schedules_start_at_one_and_end_at_the_floor(schedule, mid):
    tf = TeacherForcingConfig(schedule, tf_start_step=100, tf_floor=0.2, tf_decay_steps=1000)
    assert tf.prob(0) == 1.0 and tf.prob(100) == 1.0
    assert tf.prob(600) == pytest.approx(mid)
    end = 0.2 if schedule != "exp" else 0.2 + 0.8 * math.exp(-5)
    assert tf.prob(1100) == pytest.approx(end) and tf.prob(5000) == pytest.approx(end)
    probs = [tf.prob(s) for s in range(0, 1200, 50)]
    assert probs == sorted(probs, reverse=True)


@pytest.mark.parametrize("kw, field", [(dict(tf_schedule="sigmoid"), "tf_schedule"), (dict(tf_floor=2.0), "tf_floor"),
                                       (dict(tf_decay_steps=0), "tf_decay_steps")])
def test_bad_schedules(kw, field):
    with pytest.raises(ConfigError) as e:
        TeacherForcingConfig(**kw)
    assert e.value.field == field
