"""The generated stubs import and carry the fields every stage relies on."""

from unclip.v1 import decoder_pb2, orchestrator_pb2, tensor_pb2


def test_stubs_are_generated_and_importable():
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1, 3], data=b"\0" * 12)
    request = decoder_pb2.UpsampleRequest(images=tensor, num_inference_steps=7)
    assert decoder_pb2.UpsampleRequest.FromString(request.SerializeToString()).images.shape == [1, 3]
    assert orchestrator_pb2.GenerateRequest(prompt="a red circle").HasField("seed") is False
