"""The README's Python code runs as written and prints the answer."""
import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks():
    with open(README, encoding="utf-8") as handle:
        return re.findall(r"```python\n(.*?)```", handle.read(), flags=re.S)


def test_the_readme_has_python_code():
    assert _python_blocks()


def test_each_python_block_runs_and_answers(tmp_path):
    for index, block in enumerate(_python_blocks()):
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600,
                                env={**os.environ, "HOME": str(tmp_path)})  # a fresh cache, as for a new user
        assert result.returncode == 0, f"README block {index} failed:\n{result.stderr[-3000:]}"
        if "capital of France" in block:
            assert "Paris" in result.stdout.splitlines()[0], result.stdout[:500]
            assert "tierstore tiers" in result.stdout
