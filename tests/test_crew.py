"""nn/crew.py: a crew of threads that runs one task each, at the same time, as often as asked."""

import threading

import pytest

from ddptrain.nn.crew import Crew


def test_the_tasks_run_at_the_same_time_each_on_its_own_thread():
    crew = Crew(3)
    meeting = threading.Barrier(3, timeout=10)   # passes only if all three run at once
    threads = []

    def task():
        threads.append(threading.get_ident())
        meeting.wait()

    for _ in range(50):   # and again, with the same threads
        crew.run([task, task, task])
    crew.close()
    assert len(threads) == 150 and len(set(threads)) == 3
    assert threading.get_ident() in threads   # the caller runs the first task itself


def test_fewer_tasks_than_threads_leave_the_others_idle_and_more_are_refused():
    crew, done = Crew(3), []
    crew.run([lambda: done.append(1)])
    crew.run([lambda: done.append(2), lambda: done.append(3)])
    assert sorted(done) == [1, 2, 3]
    with pytest.raises(ValueError, match="4 tasks for a crew of 3"):
        crew.run([lambda: None] * 4)
    crew.close()


def test_an_error_in_any_task_is_raised_once_every_task_has_finished():
    crew, finished = Crew(2), []

    def slow():
        threading.Event().wait(0.05)
        finished.append("slow")

    def fails():
        raise KeyError("in a helper")

    with pytest.raises(KeyError, match="in a helper"):
        crew.run([slow, fails])
    assert finished == ["slow"]
    with pytest.raises(ZeroDivisionError):
        crew.run([lambda: 1 / 0, slow])
    assert finished == ["slow", "slow"]
    crew.run([lambda: finished.append("again"), lambda: None])   # the crew still works after
    assert finished[-1] == "again"
    crew.close()


def test_closing_stops_the_helper_threads():
    def helpers():
        return [t for t in threading.enumerate() if t.name.startswith("testcrew-") and t.is_alive()]

    crew = Crew(4, "testcrew")
    assert sorted(t.name for t in helpers()) == ["testcrew-1", "testcrew-2", "testcrew-3"]
    crew.close()
    assert helpers() == []
