"""The Trainer callback the Trainer tests share: interrupt a run after a step, like a killed job."""

import transformers


class StopAt(transformers.TrainerCallback):
    """Stops training after ``step`` (after that step's checkpoint is written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control
