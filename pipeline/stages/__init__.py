"""One module per DVC stage, each a thin ``main()``: read ``params.yaml``, call the library, write outputs.

Each ``main`` validates the params (``pipeline.config.stage_params``) before it imports the libraries it
runs on (torch, Lightning, PEFT: seconds of imports), so a bad value is refused at once.
"""
