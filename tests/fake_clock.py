"""A stand-in for `time.perf_counter` that moves only when a test says so: timings become exact numbers."""


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
