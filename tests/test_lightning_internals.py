"""The private parts of Lightning and torch that the project uses, where no public API does
the same; ``pyproject.toml`` bounds Lightning to the releases checked here (``<2.7``). A release
that changes one fails here, and the failure names the module that must change."""

import inspect
import os

import lightning as L
import torch
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def test_the_trainer_internals_of_the_module_and_the_preemption_callback(tmp_path):
    trainer = L.Trainer(logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    # training/lit_module.py: logged train/* values leave the result collection
    assert hasattr(type(trainer), "_results"), "training/lit_module.py on_train_batch_start"
    # training/callbacks.py, CheckpointOnPreemption: every rank stops after the same step, and
    # rank 0 saves without Trainer.save_checkpoint's closing barrier
    assert hasattr(trainer._signal_connector, "received_sigterm"), "CheckpointOnPreemption"
    dump = trainer._checkpoint_connector.dump_checkpoint
    assert "weights_only" in inspect.signature(dump).parameters, "CheckpointOnPreemption"


def test_the_rank_observer_that_a_ddp_sweep_job_stops():
    """launch/ddp.py ends a job's ranks after stopping Lightning's observer thread, found by its
    name and emptied through its list of processes."""
    ranks: list = []
    observer = _ChildProcessObserver(os.getpid(), ranks)
    assert observer.name == "child-process-observer", "launch/ddp.py _end_other_ranks"
    assert observer._child_processes is ranks, "launch/ddp.py _end_other_ranks"


def test_the_logger_internals_of_the_fallback_and_appending_loggers(tmp_path):
    wandb = WandbLogger(save_dir=str(tmp_path), mode="disabled", id="abc")
    # training/loggers.py, FallbackWandbLogger: restarts offline under the same id
    assert wandb._experiment is None and wandb._wandb_init["id"] == "abc", "FallbackWandbLogger"
    assert "anonymous" in wandb._wandb_init, "FallbackWandbLogger.__init__: a warning to drop"
    csv = CSVLogger(str(tmp_path))
    # training/loggers.py, AppendingCSVLogger and AppendingCSVWriter
    assert csv._experiment is None and hasattr(csv, "_fs"), "AppendingCSVLogger"
    writer = ExperimentWriter(str(tmp_path / "csv"))
    assert callable(writer._check_log_dir_exists) and hasattr(writer, "_fs"), "AppendingCSVWriter"


def test_fused_optimizers_take_a_found_inf_flag():
    """training/lit_module.py skips an update on the device through ``found_inf``, as the
    gradient scaler does, for optimizers that say they support it."""
    weight = torch.nn.Parameter(torch.ones(3))
    for optimizer_class in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        optimizer = optimizer_class([weight], lr=0.1, fused=True)
        assert optimizer._step_supports_amp_scaling, optimizer_class
        weight.grad = torch.ones(3)
        optimizer.found_inf = torch.ones(())
        optimizer.step()
        assert torch.equal(weight.detach(), torch.ones(3)), optimizer_class  # skipped


def test_the_rich_bar_names_its_epochs_through_one_method():
    """training/progress_bars.py, LiveBar: counts epochs from 1, as the log lines do."""
    from lightning.pytorch.callbacks import RichProgressBar

    assert "current_epoch" in inspect.signature(RichProgressBar._get_train_description).parameters
    assert "validation_description" in dir(RichProgressBar), "LiveBar._get_train_description"
