"""The one validator of every configuration and option class (bilevel_ssl.options)."""

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass

import pytest

import bilevel_ssl
from bilevel_ssl.bissl import BiSSLConfig, FinetuneConfig
from bilevel_ssl.config import ConfigError, TrainConfig
from bilevel_ssl.hypergrad import ENGINES, make_engine
from bilevel_ssl.meta import META_METHODS, meta_class
from bilevel_ssl.options import Options, Spec, _kind, option


def option_classes() -> list[type]:
    """Every options dataclass of the package: all modules imported, then the subclasses of Options."""
    for mod in pkgutil.walk_packages(bilevel_ssl.__path__, "bilevel_ssl."):
        importlib.import_module(mod.name)
    found, todo = set(), [Options]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub.__module__.startswith("bilevel_ssl.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return sorted((c for c in found if dataclasses.is_dataclass(c)), key=lambda c: f"{c.__module__}.{c.__name__}")


CLASSES = option_classes()


def test_the_walk_finds_every_configuration_meta_method_and_engine():
    expected = {TrainConfig, BiSSLConfig, FinetuneConfig, *ENGINES.values()}
    expected |= {meta_class(m).options for m in META_METHODS if m != "none"}
    assert expected <= set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_a_spec_and_the_defaults_pass_it(cls):
    for f in dataclasses.fields(cls):
        assert isinstance(f.metadata.get("spec"), Spec), f"{cls.__name__}.{f.name}: declare it with options.option"
        _kind(f.type)  # int, float, bool, str or dict, optionally | None
    cls()  # the defaults are valid


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unknown_keys_are_refused_with_the_known_keys(cls):
    with pytest.raises(ConfigError) as err:
        cls.from_dict({"no_such_key": 1})
    assert f"unknown {cls.what}(s) ['no_such_key']; allowed: {', '.join(cls.keys()) or '(none)'}" in str(err.value)


@pytest.mark.parametrize("meta", [m for m in META_METHODS if m != "none"])
def test_unknown_meta_args_are_refused_through_the_train_config(meta):
    with pytest.raises(ConfigError, match=rf"^meta_args: unknown {meta} option\(s\) \['no_such_key'\]; allowed: "):
        TrainConfig(meta=meta, batch_size=32, meta_args={"no_such_key": 1})


@pytest.mark.parametrize("engine", list(ENGINES))
def test_unknown_hypergrad_args_are_refused_through_the_train_config(engine):
    keys = ", ".join(ENGINES[engine].keys()) or r"\(none\)"
    with pytest.raises(ConfigError, match=rf"^hypergrad_args: unknown {engine} option\(s\) \['x'\]; allowed: {keys}$"):
        TrainConfig(meta="gessl", batch_size=32, hypergrad=engine, hypergrad_args={"x": 1})


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
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) \['lr_max'\]; allowed: objective, meta"):
        TrainConfig.from_dict({"lr_max": 0.1})  # top-level keys have no prefix


def test_a_field_without_a_spec_is_an_error_of_the_class():
    @dataclass
    class NoSpec(Options):
        n: int = 1

    with pytest.raises(TypeError, match="NoSpec.n: declare the field with bilevel_ssl.options.option"):
        NoSpec()


@pytest.mark.parametrize("build, prefix", [
    (lambda: TrainConfig(lr=0), "lr: "),
    (lambda: TrainConfig(meta="gessl", batch_size=32, meta_args={"mu": -1}), "meta_args.mu: "),
    (lambda: TrainConfig(meta="tc2", batch_size=32, meta_args={"variant": "x"}), "meta_args.variant: "),
    (lambda: TrainConfig(meta="mcr", batch_size=32, meta_args={"order": 0}), "meta_args.order: "),
    (lambda: TrainConfig(meta="multitask", batch_size=32, meta_args={"shared": "x"}), "meta_args.shared: "),
    (lambda: TrainConfig(meta="gessl", batch_size=32, hypergrad="aid_cg", hypergrad_args={"cg_iters": 0}),
     "hypergrad_args.cg_iters: "),
    (lambda: make_engine("momentum_proxy", momentum=1.5), "hypergrad_args.momentum: "),
    (lambda: BiSSLConfig(device="tpu"), "bissl.device: "),
    (lambda: FinetuneConfig.from_dict({"batch_size": 0}), "finetune.batch_size: "),
])
def test_nested_options_are_named_with_their_prefix(build, prefix):
    with pytest.raises(ConfigError) as err:
        build()
    assert str(err.value).startswith(prefix)
