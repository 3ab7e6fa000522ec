import setpoint


def test_all_is_sorted_and_matches_public_names() -> None:
    assert setpoint.__all__ == sorted(setpoint.__all__)
    public = {n for n in vars(setpoint) if not n.startswith("_") and n[0].isupper() or n in {"compile_config", "load_config", "parse_config"}}
    public -= {n for n in public if type(vars(setpoint)[n]).__name__ == "module"}
    assert set(setpoint.__all__) == public
    for name in setpoint.__all__:
        assert getattr(setpoint, name) is not None
