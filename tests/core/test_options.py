"""Options that nothing would read are refused, naming the key and why; active ones pass."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ranger_hvd.core import OptionsError, RangerOptions, compressor_momentum, make_options

# Each option that can be inactive: a value other than its default, and the other options that
# make it idle, with a word of the reason the error gives.
INACTIVE = {
    "seed": (7, {"selection": "topk"}, "random"),
    "sample_fraction": (0.05, {"selection": "random"}, "random"),
    "warmup_start_density": (0.5, {"warmup_steps": 0}, "warm-up"),
    "momentum_masking": (False, {"momentum": 0.0}, "momentum"),
}
# For each of them, settings under which it takes effect.
ACTIVE = {
    "seed": {"selection": "random"},
    "sample_fraction": {"selection": "topk"},
    "warmup_start_density": {"warmup_steps": 10},
    "momentum_masking": {"momentum": 0.9},
}


@pytest.mark.parametrize("key", sorted(INACTIVE))
def test_an_option_set_where_it_has_no_effect_is_an_error_naming_it(key):
    value, idle, reason = INACTIVE[key]
    with pytest.raises(OptionsError, match=rf"{key} \({value!r}\) has no effect: .*{reason}"):
        make_options(**idle, **{key: value})


@pytest.mark.parametrize("key", sorted(INACTIVE))
def test_the_same_option_where_it_takes_effect_passes(key):
    value = INACTIVE[key][0]
    assert getattr(make_options(**ACTIVE[key], **{key: value}), key) == value


@pytest.mark.parametrize("key", sorted(INACTIVE))
def test_defaults_given_explicitly_are_no_error(key):
    """A dump of every field fed back (a launcher config, a Keras get_config) must validate."""
    default = RangerOptions.model_fields[key].default
    make_options(**INACTIVE[key][1], **{key: default})
    assert make_options(**make_options().model_dump()) == make_options()


@settings(max_examples=150, deadline=None)
@given(selection=st.sampled_from(["topk", "random"]), warmup_steps=st.sampled_from([0, 4]),
       momentum=st.sampled_from([0.0, 0.9]),
       given_keys=st.sets(st.sampled_from(sorted(INACTIVE))))
def test_exactly_the_inactive_options_given_are_refused(selection, warmup_steps, momentum,
                                                        given_keys):
    base = {"selection": selection, "warmup_steps": warmup_steps, "momentum": momentum}
    given_values = {key: INACTIVE[key][0] for key in given_keys}
    idle = {key for key in given_keys
            if all(base[k] == v for k, v in INACTIVE[key][1].items())}
    if not idle:
        options = make_options(**base, **given_values)
        assert all(getattr(options, key) == value for key, value in given_values.items())
        return
    with pytest.raises(OptionsError) as info:
        make_options(**base, **given_values)
    message = str(info.value)
    for key in sorted(INACTIVE):
        assert (f"{key} (" in message) == (key in idle), (key, message)


def test_ranger_momentum_modes_leave_out_masking_where_the_compressor_keeps_no_momentum():
    for mode in ("global", "dgc", "local"):
        for momentum in (0.0, 0.9):
            placement = compressor_momentum(mode, momentum, {})
            assert ("momentum_masking" in placement) == (placement["momentum"] > 0)
            make_options(**placement)
