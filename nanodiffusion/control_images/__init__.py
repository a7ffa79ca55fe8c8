"""Control images for ControlNets, made without model downloads: Canny edges, OpenPose keypoints drawn as
the standard skeleton, and the resize rules that fit a control image to the generated size."""
