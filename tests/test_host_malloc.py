"""host_malloc: a script re-executes itself once with glibc's huge-page tunable; in-process callers never do."""
import os
import subprocess
import sys
import textwrap

import pytest

from mesh_transformer import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tunable = pytest.mark.skipif(not host_malloc.hugepages_possible(),
                                   reason="needs Linux, glibc >= 2.35 and transparent huge pages not 'never'")


def test_env_adds_the_tunable_once_and_keeps_other_tunables():
    if not host_malloc.hugepages_possible():
        assert host_malloc.hugepage_env({}) is None
        return
    assert host_malloc.hugepage_env({})["GLIBC_TUNABLES"] == host_malloc.TUNABLE
    env = host_malloc.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + host_malloc.TUNABLE
    assert host_malloc.hugepage_env({"GLIBC_TUNABLES": host_malloc.TUNABLE}) is None  # already set: no loop
    assert host_malloc.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice wins
    assert host_malloc.hugepage_env({host_malloc.OPT_OUT_ENV: "0"}) is None


def _script(tmp_path, body):
    path = tmp_path / "tool.py"
    path.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from mesh_transformer.cli_util import run_main
        def main(argv):
            print("pid", os.getpid(), "tunables", os.environ.get("GLIBC_TUNABLES"), "argv", sys.argv[1:])
        {body}
    """))
    return path


def _run(path, *args, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_malloc.OPT_OUT_ENV)}
    return subprocess.run([sys.executable, "-u", str(path), *args], env={**environ, **env}, capture_output=True,
                          text=True, timeout=60, check=True).stdout.split()


@needs_tunable
def test_a_script_reexecs_itself_with_its_argv(tmp_path):
    out = _run(_script(tmp_path, "if __name__ == '__main__': sys.exit(run_main(main))"), "--flag", "a b")
    assert out[3] == host_malloc.TUNABLE and out[5:] == ["['--flag',", "'a", "b']"]
    out = _run(_script(tmp_path, "if __name__ == '__main__': sys.exit(run_main(main))"), **{
        host_malloc.OPT_OUT_ENV: "0"})
    assert out[3] == "None"  # opted out


def test_run_main_with_an_argv_never_reexecs(tmp_path):
    out = _run(_script(tmp_path, "if __name__ == '__main__': sys.exit(run_main(main, ['x']))"))
    assert out[3] == "None"
