"""Ground truth given as the prediction scores 100 in detectron2's evaluators: the synthetic
files are consistent with each other in every format."""
import pytest

from aff_seg.data.synthetic import evaluate_ground_truth


def test_ground_truth_scores_100(registered_root, capsys):
    results = evaluate_ground_truth(registered_root)
    assert set(results) == {
        "ade20k_sem_seg_val mIoU",
        "coco_2017_val bbox AP",
        "coco_2017_val segm AP",
        "coco_2017_val_panoptic_with_sem_seg PQ",
        "coco_2017_val_panoptic_with_sem_seg mIoU",
        "cityscapes_fine_sem_seg_val mIoU",
        "cityscapes_fine_panoptic_val PQ",
        "lvis_v1_val bbox AP",
        "lvis_v1_val segm AP",
    }
    for key, value in results.items():
        assert value == pytest.approx(100.0), key
    assert "coco_2017_val segm AP" in capsys.readouterr().out


def test_subset_of_datasets(registered_root):
    results = evaluate_ground_truth(registered_root, datasets=("ade20k",), verbose=False)
    assert list(results) == ["ade20k_sem_seg_val mIoU"]
