"""`dckpt demo --readme README.md` writes the run's own output into the README's demo
section, so the figures there come from a committed command, not from a hand copy."""
import pytest

from dckpt.demo import BEGIN, END, _write_readme


def test_the_demo_section_is_replaced_by_the_run_output(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{BEGIN}\nold figures\n{END}\n\nkept\n")
    output = ("dckpt demo: ...\nwork directory: /tmp/dckpt-demo-abc\n\n[1/6] reference\n"
              "[2/6] the same run\n      step  30: checkpoint_30 committed in 99 ms\n"
              "loss curve plot: /tmp/dckpt-demo-abc/dckpt-demo.png\n"
              "demo finished in 120 s; files in /tmp/dckpt-demo-abc\n")
    _write_readme(readme, output, (0.5, 0.5, 0.5))
    text = readme.read_text()
    assert "old figures" not in text and "[1/6]" not in text and text.endswith(f"{END}\n\nkept\n")
    assert "checkpoint_30 committed in 99 ms" in text and "/tmp/dckpt-demo-abc" not in text
    assert "load average 0.5 before" in text and "cores" in text


def test_a_readme_without_the_section_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing to replace\n")
    with pytest.raises(SystemExit):
        _write_readme(readme, "[2/6] x\n", (0.0, 0.0, 0.0))
    assert readme.read_text() == "# nothing to replace\n"
