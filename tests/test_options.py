"""Options declared once (`tl_devinterp.options`): one validator, one message format, other spellings."""

from dataclasses import dataclass

import pytest

from tl_devinterp import AnalysisConfig, SGLDConfig, TLDevinterpError
from tl_devinterp.options import OptionWarning, build, option, validate


@dataclass
class Toy:
    step: float = option(0.1, "step size", gt=0, aliases={"lr": "devinterp's default is 0.01", "eta": None})
    kind: str = option("a", "which", choices=("a", "b"))
    count: int | None = option(None, "how many", ge=2, why="(two at least)")

    def __post_init__(self):
        validate(self)


def test_one_message_format_for_type_range_and_choices():
    """Catches: a validator that lets a bad value through, or a message that does not name the option, the
    class, the rule and the value given."""
    for kwargs, message in [(dict(step=-1), "The 'step' option of Toy must be > 0; got -1."),
                            (dict(step="1"), "The 'step' option of Toy must be a finite number; got '1' (str)."),
                            (dict(step=float("nan")), "The 'step' option of Toy must be a finite number"),
                            (dict(kind="c"), "The 'kind' option of Toy must be one of ['a', 'b']; got 'c'."),
                            (dict(count=1), "The 'count' option of Toy must be >= 2 (two at least); got 1."),
                            (dict(count=True), "The 'count' option of Toy must be an integer or None; got True")]:
        with pytest.raises(TLDevinterpError) as e:
            Toy(**kwargs)
        assert str(e.value).startswith(message) and isinstance(e.value, ValueError) and isinstance(e.value, TypeError)
    assert Toy(step=1).step == 1.0 and isinstance(Toy(step=1).step, float)  # an int for a float is one setting


def test_aliases_are_mapped_once_with_their_note():
    """Catches: another library's spelling ignored or refused, given twice silently, or its differing default
    not mentioned."""
    assert build(Toy, {"eta": 0.5}) == {"step": 0.5}
    with pytest.warns(OptionWarning, match="'lr' is read as Toy's 'step': devinterp's default is 0.01"):
        assert build(Toy, {"lr": 0.5}) == {"step": 0.5}
    with pytest.raises(ValueError, match="'step' option of Toy is given twice"):
        build(Toy, {"lr": 0.5, "step": 0.1})
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['stepp'\] of Toy in my.toml; valid options"):
        build(Toy, {"stepp": 1}, source="my.toml")


def test_every_configuration_uses_the_declared_options():
    """Catches: a configuration class that keeps a hand-written check (other words, or none) for an option."""
    with pytest.raises(ValueError, match="The 'epsilon' option of SGLDConfig must be > 0; got -1."):
        SGLDConfig(epsilon=-1)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['num_drawz'\] of SGLDConfig"):
        SGLDConfig.build(num_drawz=3)
    with pytest.raises(ValueError, match="The 'n_probe_seqs' option of AnalysisConfig must be >= 1; got 0"):
        AnalysisConfig(n_probe_seqs=0)
    from tl_devinterp import Intervention, ModelConfig, TrainConfig

    with pytest.raises(ValueError, match="The 'lr' option of TrainConfig must be >= 0; got -0.1"):
        TrainConfig(lr=-0.1)
    with pytest.raises(ValueError, match="The 'n_heads' option of ModelConfig must be >= 1; got 0"):
        ModelConfig(n_heads=0)
    with pytest.raises(ValueError, match="The 'start' option of Intervention must be >= 0; got -1"):
        Intervention("blocks.0.attn.hook_z", "zero", start=-1)


def test_analysis_sequence_counts_have_one_name_each_and_keep_their_old_spellings():
    """Catches: the test-sequence and probe-sequence counts swapped when their old spellings (`n_sequences`,
    `n_seqs`) are read, or an old spelling refused as unknown."""
    from tl_devinterp import AnalysisConfig

    config = AnalysisConfig.from_dict(dict(n_sequences=32, n_seqs=8), source="a config file")
    assert (config.n_test_seqs, config.n_probe_seqs) == (32, 8)
    with pytest.raises(ValueError, match="'n_test_seqs' option of AnalysisConfig is given twice"):
        AnalysisConfig.from_dict(dict(n_sequences=32, n_test_seqs=32))
