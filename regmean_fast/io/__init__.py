"""I/O: lazy safetensors reading (pread per tensor), streamed sharded writing, Hugging Face folder conventions,
what --resume does with what an earlier run left (resume)."""

from .hf import ModelFolder, ModelFolderError, copy_aux_files, write_config, write_index
from .resume import CONTINUE, DONE, FRESH, Found, ResumeError, resume_action
from .safetensors_file import SafetensorsError, SafetensorsReader, StreamingShardWriter, file_sha256
from .shards import ShardLayout, ShardedOutput, parse_size

__all__ = [
    "ModelFolder", "ModelFolderError", "copy_aux_files", "write_config", "write_index", "SafetensorsError",
    "SafetensorsReader", "StreamingShardWriter", "file_sha256", "ShardLayout", "ShardedOutput", "parse_size",
    "CONTINUE", "DONE", "FRESH", "Found", "ResumeError", "resume_action",
]
