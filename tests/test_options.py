"""The one validator of every configuration and option class (bilevel_ssl.options)."""

from dataclasses import dataclass

import pytest

from bilevel_ssl.options import ConfigError, Options, option


# ----------------------------------------------------------------------------------------------- the validator

@dataclass
class Toy(Options):
    where = "toy"
    what = "toy option"

    n: int = option(1, lo=1)
    x: float = option(0.5, lo=0, hi=1, hi_open=True)
    y: float | None = option(None, lo=0, lo_open=True, help="None: automatic")
    mode: str = option("a", choices=("a", "b"))
    preset: str = option("", choices=("", "p"))
    flag: bool = option(False)
    name: str = option("")
    extra: dict = option(factory=dict)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, r"toy.n: must be an integer >= 1, got 0"),
    ({"n": 2.0}, r"toy.n: must be an integer >= 1, got float 2.0"),
    ({"n": True}, r"toy.n: must be an integer >= 1, got bool True"),
    ({"n": None}, r"toy.n: must be an integer >= 1, got NoneType None"),
    ({"x": 1.0}, r"toy.x: must be a number in \[0, 1\), got 1.0"),
    ({"x": -0.1}, r"toy.x: must be a number in \[0, 1\), got -0.1"),
    ({"x": float("nan")}, r"toy.x: must be a number in \[0, 1\), got nan"),
    ({"x": "0.5"}, r"toy.x: must be a number in \[0, 1\), got str '0.5' \(YAML 1.1 reads 1e-3 as a string: "
                   r"write 1.0e-3\)"),
    ({"y": 0}, r"toy.y: must be a finite number > 0 or None \(None: automatic\), got 0"),
    ({"y": float("inf")}, r"toy.y: must be a finite number > 0 or None \(None: automatic\), got inf"),
    ({"mode": "c"}, r"toy.mode: unknown value 'c'; allowed: a, b"),
    ({"mode": None}, r"toy.mode: unknown value None; allowed: a, b"),
    ({"preset": "q"}, r"toy.preset: unknown value 'q'; allowed: '' \(none\), p"),
    ({"flag": 1}, r"toy.flag: must be true or false, got int 1"),
    ({"name": 3}, r"toy.name: must be a string, got int 3"),
    ({"extra": []}, r"toy.extra: must be a dict, got list \[\]"),
])
def test_type_choice_and_range_errors_name_the_key_and_what_is_allowed(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        Toy(**kwargs)
    with pytest.raises(ValueError):  # a ConfigError is a ValueError
        Toy.from_dict(kwargs)


def test_valid_values_pass():
    toy = Toy(n=3, x=0, y=2, mode="b", preset="", flag=True, name="z", extra={"k": 1})  # ints are valid floats
    assert (toy.x, toy.y) == (0, 2) and isinstance(toy.x, int)  # values are checked, never converted
    assert Toy(y=None).y is None and Toy.from_dict({"n": 5}).n == 5


def test_unknown_keys_and_non_dicts():
    with pytest.raises(ConfigError, match=r"^toy: unknown toy option\(s\) \['m', 'z'\]; "
                                          r"allowed: n, x, y, mode, preset, flag, name, extra$"):
        Toy.from_dict({"z": 1, "m": 2, "n": 3})
    with pytest.raises(ConfigError, match=r"^toy: expected a dict of options, got list$"):
        Toy.from_dict([("n", 1)])


def test_a_field_without_a_spec_is_an_error_of_the_class():
    @dataclass
    class NoSpec(Options):
        n: int = 1

    with pytest.raises(TypeError, match="NoSpec.n: declare the field with bilevel_ssl.options.option"):
        NoSpec()
