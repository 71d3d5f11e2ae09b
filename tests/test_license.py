"""The project's licence: the standard Apache License 2.0 text in LICENSE, stated in the README and in
the package metadata (issue 20, item 10)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("Definitions", "Grant of Copyright License", "Grant of Patent License", "Redistribution",
            "Submission of Contributions", "Trademarks", "Disclaimer of Warranty", "Limitation of Liability",
            "Accepting Warranty or Additional Liability")


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_licence_is_apache_2_and_stated():
    text = read("LICENSE")
    head = [line.strip() for line in text.strip().splitlines()[:3]]
    assert head == ["Apache License", "Version 2.0, January 2004", "http://www.apache.org/licenses/"]
    found = re.findall(r"^\s+(\d)\. (.+?)\.", text, flags=re.M)
    assert [(int(n), title) for n, title in found] == list(enumerate(SECTIONS, 1))
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    stated = [line for line in read("README.md").splitlines() if "Apache License 2.0" in line]
    assert len(stated) == 1 and "[LICENSE](LICENSE)" in stated[0]
    assert 'license="Apache-2.0"' in read("setup.py")
