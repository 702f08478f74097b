"""The suite's skip rule (skip_policy.py): only `gpu` tests may skip; any other skip fails the run."""

from __future__ import annotations

import pytest

INI = """
[pytest]
markers =
    gpu: needs CUDA
"""


def run(pytester: pytest.Pytester, **modules: str) -> pytest.RunResult:
    """A pytest run over `modules` with the plugin the suite uses (in process: the plugin is imported)."""
    pytester.makeini(INI)
    pytester.makepyfile(**modules)
    return pytester.runpytest("-p", "skip_policy")


def test_a_skip_without_the_gpu_marker_fails_the_run(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        test_a="""
            import pytest

            def test_ok():
                pass

            def test_no_service():
                pytest.skip("no redis-server on 127.0.0.1:6379")
        """,
    )
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*1 skipped that must not skip*", "SKIPPED test_a.py::test_no_service: no redis-server on 127.0.0.1:6379"]
    )


def test_a_skipping_fixture_or_import_fails_the_run(pytester: pytest.Pytester) -> None:
    """What the suite used to do: skip in a fixture when a service is down, importorskip a module."""
    result = run(
        pytester,
        test_fixture="""
            import pytest

            @pytest.fixture
            def service():
                pytest.skip("service down")

            def test_uses(service):
                pass
        """,
        test_import="""
            import pytest

            pytest.importorskip("kold_module_that_does_not_exist")

            def test_never_collected():
                pass
        """,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*2 skipped that must not skip*",
            "SKIPPED test_import.py: could not import 'kold_module_that_does_not_exist'*",  # at collection
            "SKIPPED test_fixture.py::test_uses: service down",
        ]
    )


def test_gpu_skips_and_xfails_pass(pytester: pytest.Pytester) -> None:
    """A `gpu` test may skip, whether the test skips or its module does while importing (marked
    after the skip, as tests/snapshot/test_gpu.py is); an expected failure is not a skip."""
    result = run(
        pytester,
        test_gpu_item="""
            import pytest

            @pytest.mark.gpu
            def test_needs_cuda():
                pytest.skip("no CUDA device for torch")

            @pytest.mark.xfail(strict=True, reason="a known defect")
            def test_known_defect():
                assert False
        """,
        test_gpu_module="""
            import pytest

            pytest.skip("no CUDA device for torch", allow_module_level=True)

            pytestmark = [pytest.mark.gpu]

            def test_on_cuda():
                pass
        """,
    )
    result.assert_outcomes(skipped=2, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.no_fnmatch_line("*must not skip*")


def test_a_failing_run_keeps_its_status(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        test_a="""
            import pytest

            def test_fails():
                assert False

            def test_skips():
                pytest.skip("why")
        """,
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["SKIPPED test_a.py::test_skips: why"])
