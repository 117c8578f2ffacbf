"""Helpers shared by the tests, one module per kind of help:

- `weights`: small weights files with valid model cards (`write_test_weights`);
- `images`: pictures in any format (`noise_image`, `image_bytes`, `png`);
- `reference`: what the model gives for one image alone (`reference_probabilities`);
- `service`: the app in process (`settings_for`, `running`, `wait_ready`, `GatedEngine`,
  `metric`);
- `server`: real sockets (`free_port`, `serving` an app under uvicorn, `wait_process_ready`
  for `python -m service`);
- `tools`: the project root and external tools (`PROJECT_ROOT`, `require_tool`).
"""
