"""AccVideo Save Video: IMAGE frames -> H.264 mp4 with the prompt and workflow embedded."""
from __future__ import annotations

import json

from comfy_api.v0_0_2 import io, ui


class AccVideoSaveVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoSaveVideo",
            display_name="AccVideo Save Video",
            category="AccVideo/video",
            description="Saves IMAGE frames as an H.264 mp4 (yuv420p, imageio-ffmpeg's bundled ffmpeg) in the "
                        "output folder, with the API prompt and the UI workflow stored as container metadata "
                        "(tags 'prompt' and 'workflow'), and shows it in the UI.",
            inputs=[
                io.Image.Input("images", tooltip="Frames in order (a decoded video: VAE Decode output)."),
                io.Float.Input("fps", default=24.0, min=1.0, max=240.0, step=1.0,
                               tooltip="Frames per second (HunyuanVideo and AccVideo: 24)."),
                io.String.Input("filename_prefix", default="AccVideo/video",
                                tooltip="Prefix under the output folder; may contain a subfolder."),
                io.Int.Input("crf", default=19, min=0, max=51,
                             tooltip="H.264 quality: lower is better and larger (0 = lossless, 19 ~ visually "
                                     "lossless, 23 = x264 default)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, fps, filename_prefix, crf) -> io.NodeOutput:
        import os

        import folder_paths
        from comfy.cli_args import args

        from accvideo_core.video import write_mp4

        if images.ndim != 4 or images.shape[0] < 1:
            raise ValueError(f"images must be IMAGE frames [N, H, W, 3], got shape {tuple(images.shape)}")
        height, width = int(images.shape[1]), int(images.shape[2])
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        metadata = {}
        if not args.disable_metadata:
            if cls.hidden.prompt is not None:
                metadata["prompt"] = json.dumps(cls.hidden.prompt)
            for key, value in (cls.hidden.extra_pnginfo or {}).items():
                metadata[key] = json.dumps(value)
        while True:  # another server sharing the output folder may have taken the counter meanwhile
            file = f"{filename}_{counter:05}_.mp4"
            try:
                write_mp4(images, os.path.join(folder, file), fps=fps, crf=crf, metadata=metadata, exclusive=True)
                break
            except FileExistsError:
                counter += 1
        return io.NodeOutput(ui=ui.PreviewVideo([ui.SavedResult(file, subfolder, io.FolderType.output)]))
