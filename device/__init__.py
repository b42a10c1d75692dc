"""edgeq's Raspberry Pi side (installed as ``edgeq.device``): sources, pipeline, decoders, MQTT, service glue.

It never imports TensorFlow, Keras or :mod:`edgeq.converter`; a Pi installs ``edgeq[device]`` only.
"""
