"""docs/prms.md's table is the registry's own (`ets prms --markdown`), so the docs cannot drift."""

from pathlib import Path

from ets.prm import registry

DOC = Path(__file__).resolve().parent.parent / "docs" / "prms.md"


def test_the_docs_table_is_the_registrys():
    table = registry.markdown_table()
    assert table in DOC.read_text(encoding="utf-8"), (
        "docs/prms.md is out of date: regenerate its table with `ets prms --markdown`")
    for kind in registry.kinds().values():
        assert kind.summary and kind.tested, f"PRM kind {kind.name} needs a summary and a `tested` line"


def test_cli_prints_the_table(capsys):
    from ets.cli import main

    assert main(["prms", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == registry.markdown_table()
    assert main(["prms"]) == 0
    assert "reference" in capsys.readouterr().out
