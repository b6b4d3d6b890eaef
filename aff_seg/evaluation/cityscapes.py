"""detectron2's Cityscapes instance evaluator, with cityscapesscripts' ``matches.json`` kept out of
the working directory."""
import os

from detectron2.evaluation import CityscapesInstanceEvaluator as _CityscapesInstanceEvaluator

__all__ = ["CityscapesInstanceEvaluator"]


class CityscapesInstanceEvaluator(_CityscapesInstanceEvaluator):
    """``detectron2.evaluation.CityscapesInstanceEvaluator`` whose evaluation writes the
    (prediction, ground truth) matches into ``output_dir``.

    cityscapesscripts (2.3) writes ``matches.json`` into the current directory and has no option
    for it; during ``evaluate`` its writer is pointed at ``output_dir`` (default: the evaluator's
    temporary folder, removed afterwards).
    """

    def __init__(self, dataset_name, output_dir=None):
        super().__init__(dataset_name)
        self._output_dir = output_dir

    def evaluate(self):
        import cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling as cityscapes_eval

        folder = self._output_dir or self._temp_dir
        write = cityscapes_eval.writeDict2JSON

        def write_into_folder(data, file_name):
            os.makedirs(folder, exist_ok=True)
            write(data, os.path.join(folder, os.path.basename(file_name)))

        cityscapes_eval.writeDict2JSON = write_into_folder
        try:
            return super().evaluate()
        finally:
            cityscapes_eval.writeDict2JSON = write
