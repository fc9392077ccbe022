"""docs/architecture.md stays true: every module under dmd2/ is named in it."""

from helpers import REPO


def test_every_module_is_named_in_the_architecture_doc():
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path in sorted((REPO / "dmd2").rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(REPO / "dmd2")
        names = {rel.as_posix(), ".".join(rel.with_suffix("").parts)}
        if not any(n in doc for n in names):
            missing.append(rel.as_posix())
    assert not missing, f"docs/architecture.md does not name: {missing}"
