"""The CP cost model: fits a linear kernel time, adds all-gathers; two levels pay off across nodes."""
import importlib.util
import os

spec = importlib.util.spec_from_file_location(
    "cost_model", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cost_model.py"))
cm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cm)


def test_fit_recovers_a_line():
    a, b = cm.fit_kernel([(1000, 0.002 + 1e-6 * 1000), (5000, 0.002 + 1e-6 * 5000), (9000, 0.002 + 1e-6 * 9000)])
    assert abs(a - 0.002) < 1e-9 and abs(b - 1e-6) < 1e-12


def test_summary_traffic_is_independent_of_length():
    A, S = cm.summary_bytes(16, 128, 128)
    assert A == 16 * 2 * 128 * 4 and S == 16 * 128 * 256 * 4  # 16 KiB and 2 MiB per rank and pass


def test_scaling_and_two_level_exchange():
    kernel = (1e-3, 1e-7)
    one = cm.step_time(2 ** 20, 1, kernel, 16, 128, 128, summary_frac=0.25, intra=cm.LINKS["nvlink"])
    eight = cm.step_time(2 ** 20, 8, kernel, 16, 128, 128, summary_frac=0.25, intra=cm.LINKS["nvlink"])
    assert one / eight > 5  # compute-bound at a million tokens: near-linear speed-up on one node
    flat = cm.step_time(2 ** 20, 512, kernel, 16, 128, 128, summary_frac=0.25, intra=cm.LINKS["nvlink"],
                        inter=cm.LINKS["infiniband"])
    two = cm.step_time(2 ** 20, 512, kernel, 16, 128, 128, summary_frac=0.25, intra=cm.LINKS["nvlink"],
                       inter=cm.LINKS["infiniband"], two_level=True)
    assert two < flat


def test_summary_share_is_recovered_from_measurements():
    kernel, links = (1e-3, 1e-7), cm.LINKS["nvlink"]
    measured = [(T, W, cm.step_time(T, W, kernel, 16, 128, 128, summary_frac=0.07, intra=links))
                for T, W in ((2 ** 17, 2), (2 ** 19, 2), (2 ** 20, 4))]
    assert abs(cm.fit_summary_frac(measured, kernel, 16, 128, 128, links) - 0.07) < 1e-3
