#!/usr/bin/env python
"""Write ``lvis/lvis_v1_val_cocofied.json``: LVIS v1 val restricted to the 80 COCO classes.

    python tools/datasets/prepare_cocofied_lvisv1.py [--root $DETECTRON2_DATASETS]

COCO-trained instance models can then be scored against LVIS's more exhaustive masks
(``DATASETS.TEST ("lvis_v1_val_cocofied",)``, evaluator type ``lvis``).  What the original's
script does, step for step:

* drops the LVIS v1 val images that come from COCO ``train2017`` (by their ``coco_url``), with
  their annotations, and renumbers the remaining images 1..N; ``file_name`` is taken from the
  ``coco_url`` (``val2017/<name>``'s basename);
* keeps the annotations of LVIS categories whose synset is a COCO class, with the COCO category
  id, renumbered 1..M;
* maps each image's ``not_exhaustive_category_ids`` and ``neg_category_ids`` to COCO ids (other
  categories are dropped from the lists);
* keeps the COCO categories that occur in an annotation or in one of those image lists, with
  their COCO ids.
"""
import argparse
import copy
import json
import os
from collections import OrderedDict

# LVIS synset -> COCO category id, from the LVIS API's coco_to_synset mapping (80 classes)
COCO_ID_OF_SYNSET = {
    "person.n.01": 1, "bicycle.n.01": 2, "car.n.01": 3, "motorcycle.n.01": 4, "airplane.n.01": 5,
    "bus.n.01": 6, "train.n.01": 7, "truck.n.01": 8, "boat.n.01": 9, "traffic_light.n.01": 10,
    "fireplug.n.01": 11, "stop_sign.n.01": 13, "parking_meter.n.01": 14, "bench.n.01": 15,
    "bird.n.01": 16, "cat.n.01": 17, "dog.n.01": 18, "horse.n.01": 19, "sheep.n.01": 20,
    "beef.n.01": 21, "elephant.n.01": 22, "bear.n.01": 23, "zebra.n.01": 24, "giraffe.n.01": 25,
    "backpack.n.01": 27, "umbrella.n.01": 28, "bag.n.04": 31, "necktie.n.01": 32, "bag.n.06": 33,
    "frisbee.n.01": 34, "ski.n.01": 35, "snowboard.n.01": 36, "ball.n.06": 37, "kite.n.03": 38,
    "baseball_bat.n.01": 39, "baseball_glove.n.01": 40, "skateboard.n.01": 41,
    "surfboard.n.01": 42, "tennis_racket.n.01": 43, "bottle.n.01": 44, "wineglass.n.01": 46,
    "cup.n.01": 47, "fork.n.01": 48, "knife.n.01": 49, "spoon.n.01": 50, "bowl.n.03": 51,
    "banana.n.02": 52, "apple.n.01": 53, "sandwich.n.01": 54, "orange.n.01": 55,
    "broccoli.n.01": 56, "carrot.n.01": 57, "frank.n.02": 58, "pizza.n.01": 59,
    "doughnut.n.02": 60, "cake.n.03": 61, "chair.n.01": 62, "sofa.n.01": 63, "pot.n.04": 64,
    "bed.n.01": 65, "dining_table.n.01": 67, "toilet.n.02": 70, "television_receiver.n.01": 72,
    "laptop.n.01": 73, "mouse.n.04": 74, "remote_control.n.01": 75, "computer_keyboard.n.01": 76,
    "cellular_telephone.n.01": 77, "microwave.n.02": 78, "oven.n.01": 79, "toaster.n.02": 80,
    "sink.n.01": 81, "electric_refrigerator.n.01": 82, "book.n.01": 84, "clock.n.01": 85,
    "vase.n.01": 86, "scissors.n.01": 87, "teddy.n.01": 88, "hand_blower.n.01": 89,
    "toothbrush.n.01": 90,
}


def cocofy_lvis(lvis):
    """The cocofied copy of an LVIS json dict (see module doc); ``lvis`` is not modified."""
    synset_of = {c["id"]: c["synset"] for c in lvis["categories"]}

    def coco_id(lvis_category_id):
        return COCO_ID_OF_SYNSET.get(synset_of[lvis_category_id])

    used = OrderedDict()  # COCO ids seen in annotations or image category lists
    new_image_id = {}
    images = []
    for image in lvis["images"]:
        split, file_name = image["coco_url"].split("/")[-2:]
        if split == "train2017":
            continue
        new = copy.deepcopy(image)
        new_image_id[image["id"]] = new["id"] = len(images) + 1
        new["file_name"] = file_name
        for key in ("not_exhaustive_category_ids", "neg_category_ids"):
            ids = [coco_id(c) for c in image.get(key, [])]
            new[key] = [c for c in ids if c is not None]
            used.update((c, True) for c in new[key])
        images.append(new)

    annotations = []
    for annotation in lvis["annotations"]:
        category = coco_id(annotation["category_id"])
        if annotation["image_id"] not in new_image_id or category is None:
            continue
        new = copy.deepcopy(annotation)
        new.update(id=len(annotations) + 1, image_id=new_image_id[annotation["image_id"]], category_id=category)
        annotations.append(new)
        used[category] = True

    categories = []
    for category in lvis["categories"]:
        cid = COCO_ID_OF_SYNSET.get(category["synset"])
        if cid is not None and cid in used:
            categories.append(dict(copy.deepcopy(category), id=cid))

    out = {k: copy.deepcopy(v) for k, v in lvis.items() if k not in ("images", "annotations", "categories")}
    out.update(images=images, annotations=annotations, categories=categories)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                        help="datasets root holding lvis/lvis_v1_val.json")
    args = parser.parse_args(argv)
    source = os.path.join(args.root, "lvis", "lvis_v1_val.json")
    target = os.path.join(args.root, "lvis", "lvis_v1_val_cocofied.json")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source} not found: download LVIS v1 val into {os.path.dirname(source)}")
    with open(source) as f:
        lvis = json.load(f)
    with open(target, "w") as f:
        json.dump(cocofy_lvis(lvis), f)
    print(f"{source} cocofied into {target}")


if __name__ == "__main__":
    main()
