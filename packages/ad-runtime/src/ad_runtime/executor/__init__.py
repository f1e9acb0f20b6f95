"""The continuous-batching executor: requests, scheduling, sampling and the step loop."""
