"""`lorabooth ui`: the whole workflow in a local web page (Gradio) over the
same functions and config tree as the CLI. workspace: the one folder the
page may touch; jobs: the background queue; trainform: the form generated
from TrainConfig; handlers: what each button does; app: the layout;
server: who may connect. Importing this package loads no gradio."""
