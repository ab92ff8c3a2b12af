"""The one reader of Hydra's command-line strings and run records (resnet_cli/overrides.py)."""

from resnet_cli.overrides import override_key, recorded_config, split_override


def test_split_override_strips_hydra_prefixes_and_keeps_the_value_as_typed():
    assert split_override("+model.freeze=[stem]") == ("model.freeze", "[stem]")
    assert split_override("~trainer.grad_clip") == ("trainer.grad_clip", "")
    assert split_override("data.root=/a=b") == ("data.root", "/a=b")  # only the first '=' splits
    assert override_key("++lr=0.1") == "lr"


def test_recorded_config_names_only_what_the_command_line_gave():
    ours = {"runtime": {"config_sources": [{"provider": "hydra", "path": "pkg://hydra.conf"},
                                            {"provider": "main", "path": "/site/configs"}]},
            "job": {"config_name": "train"}}
    assert recorded_config(ours) == (None, None)
    theirs = {"runtime": {"config_sources": [{"provider": "main", "path": "/site/configs"},
                                              {"provider": "command-line", "path": "/home/u/cfg"}]},
              "job": {"config_name": "mine"}}
    assert recorded_config(theirs) == ("/home/u/cfg", "mine")
    assert recorded_config({}) == (None, None)  # a record without these nodes
