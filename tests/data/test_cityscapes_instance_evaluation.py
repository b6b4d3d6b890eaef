"""The Cityscapes instance evaluator writes cityscapesscripts' matches into its output folder,
never into the working directory."""
import os

from aff_seg.data.synthetic.evaluation import _instances
from aff_seg.evaluation.cityscapes import CityscapesInstanceEvaluator


def test_matches_go_to_the_output_folder(registered_root, tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    name = "cityscapes_fine_instance_seg_val"
    evaluator = CityscapesInstanceEvaluator(name, output_dir=str(tmp_path / "inference"))
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        evaluator.process([record], [{"instances": _instances(record)}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] > 50  # the ground truth (rasterised from its polygons) as prediction
    assert os.listdir(work) == []
    assert (tmp_path / "inference" / "matches.json").stat().st_size > 0
