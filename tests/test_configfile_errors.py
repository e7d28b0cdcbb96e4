"""--config values on the other branches: a false flag, values TOML allows but we do not."""

from __future__ import annotations

from pathlib import Path

import pytest

from delivery_executor.cli import main

pytestmark = [pytest.mark.timeout(60)]


def check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> tuple[int, str, str]:
    conf = tmp_path / "de.toml"
    conf.write_text(text)
    code = main(["check-config", "--config", str(conf)])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_false_flag_means_the_option_that_sets_its_opposite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lmtp = false is --smtp; lmtp = true, the default, prints nothing."""
    assert check_config(tmp_path, capsys, "lmtp = false\n") == (0, "smtp = true\n", "")
    assert check_config(tmp_path, capsys, "lmtp = true\n") == (0, "", "")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "max_batch = 2024-01-01\n",
            "max_batch: datetime.date(2024, 1, 1) is not a string or number",
        ),
        ("max_size = { a = 1 }\n", "max_size: {'a': 1} is not a string or number"),
        ('listen = [["127.0.0.1:1"]]\n', "listen: ['127.0.0.1:1'] is not a string or number"),
        ("lmtp = 1\n", "lmtp must be true or false, not 1"),
    ],
)
def test_values_that_are_not_strings_or_numbers_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, reason: str
) -> None:
    """A TOML date, table or nested list is refused in one line naming the key and the value."""
    code, out, err = check_config(tmp_path, capsys, text)
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1 and reason in err, err
